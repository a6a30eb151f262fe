"""Scenario 9 (issue 22 §3): CPU-seconds read between two moments, and the figures of a
run (start-up taken off, ratio to the limit, CPU per GiB)."""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_common import CpuTrace, cpu_seconds, tree_pids
from benchmarks.bench_systems import RunResult, Spec
from benchmarks.scenario_bigoverlap import GIB, row_of


def test_a_cpu_trace_reads_the_last_sample_at_or_before_a_moment() -> None:
    trace = CpuTrace()
    for wall, cpu in ((10.0, 1.0), (10.2, 1.5), (10.4, 2.5)):
        trace.add(cpu, wall)
    assert trace.at(9.0) == 0.0
    assert trace.at(10.3) == 1.5
    assert trace.between(10.0, 10.4) == pytest.approx(1.5)


def test_the_cpu_of_this_process_tree_is_read_from_proc() -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc on this system")
    before = cpu_seconds(tree_pids(os.getpid()))
    sum(i * i for i in range(300_000))
    assert os.getpid() in tree_pids(os.getpid())
    assert cpu_seconds(tree_pids(os.getpid())) > before


def test_a_runs_figures_take_the_start_up_off_the_time_and_the_cpu() -> None:
    result = RunResult(Spec("ours"), seconds=10.0, first_s=3.0, n_files=8,
                       total_bytes=GIB, peak_rss=300 << 20, argv=[], startup_s=2.0,
                       cpu_s=7.0, cpu_startup_s=1.0)
    row = row_of(result, {"girder": 4.0, "machine busy": 0.8}, limit_s=4.0)
    assert row["s w/o start-up"] == 8.0
    assert row["× limit"] == pytest.approx(0.5)
    assert row["CPU s/GiB"] == pytest.approx(7.0)
    assert row["CPU s/GiB w/o start-up"] == pytest.approx(6.0)
    assert row["peak RSS MiB"] == 300
    assert row["girder CPU s"] == 4.0 and row["machine busy"] == 0.8
