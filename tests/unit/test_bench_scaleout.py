"""Scenarios 10 and 11 (issue 23): the steady-state window, the CPU accounts of a run,
the machine's ceiling and the best ratio it allows, the variants' specs and data, and
the tables' cells."""

from __future__ import annotations

import math
import os

import pytest

from benchmarks.bench_data import CHUNK_SIZE, Dataset, produce
from benchmarks.bench_systems import RunResult, Spec
from benchmarks.cpu_census import Census, spent, take
from benchmarks.run_all import SCENARIOS, parse_args
from benchmarks.scaleout_figures import (RunCpu, best_ratio, beyond_delay_ms, median_or_none,
                                         percentile, steady_rate)
from benchmarks.scaleout_report import best_of, cpu_table, rate_of, rate_rows, routes_per_file
from benchmarks.scaleout_runs import Observed
from benchmarks.scenario_scaleout_files import Variant, several_chunks_tree


def test_the_steady_rate_counts_the_files_between_10_and_90_percent_landed() -> None:
    # 10 files: the 1st landed at 0, then one a second from 10 s on; the 9th at 17 s
    landed = [0.0] + [10.0 + i for i in range(9)]
    # the 1st file (10%) at 0 s, the 9th (90%) at 17 s: 8 files in 17 s
    assert steady_rate(landed) == pytest.approx(8 / 17)
    assert steady_rate(list(reversed(landed))) == steady_rate(landed)  # any order
    # 100 files a second apart after a slow start: the window leaves the start out
    landed = [0.0] * 5 + [30.0 + i for i in range(95)]
    assert steady_rate(landed) == pytest.approx(1.0)


def test_the_steady_rate_is_unknown_with_too_few_files_or_no_time() -> None:
    assert steady_rate([]) is None
    assert steady_rate([5.0]) is None
    assert steady_rate([5.0, 5.0, 5.0, 5.0]) is None
    assert steady_rate([1.0, 2.0]) == pytest.approx(1.0)


def _cpu(**changes) -> RunCpu:
    figures = dict(span_s=10.0, files=100, consumers=[3.0, 2.0],
                   services={"girder": 6.0, "mongo": 2.0, "kafka": 1.0}, harness=0.5,
                   producer=0.5, busy=0.9, cores=2)
    return RunCpu(**{**figures, **changes})


def test_the_ceiling_is_the_cores_over_the_cpu_per_file_of_all_but_the_consumers() -> None:
    cpu = _cpu()
    assert cpu.consumers_total == 5.0
    assert cpu.girder_db == 8.0
    assert cpu.not_consumers == 10.0
    assert cpu.per_file(cpu.not_consumers) == pytest.approx(0.1)
    assert cpu.ceiling == pytest.approx(20.0)  # 2 cores / 0.1 CPU-s per file
    assert cpu.unaccounted == pytest.approx(0.9 * 2 * 10 - 15.0)
    assert cpu.girder_ceiling == pytest.approx(1 / 0.06)  # 6 CPU-s for 100 files
    assert _cpu(services={}).girder_ceiling is None


def test_the_ceiling_and_the_unaccounted_cpu_are_unknown_without_figures() -> None:
    assert _cpu(files=0).ceiling is None
    assert _cpu(services={}, harness=0.0, producer=0.0).ceiling is None
    assert _cpu(busy=math.nan).unaccounted == 0.0
    assert _cpu(busy=0.1).unaccounted == 0.0  # never negative


def test_the_best_ratio_is_n_times_one_process_below_the_ceilings() -> None:
    assert best_ratio(2, 10.0, 100.0) == pytest.approx(2.0)
    assert best_ratio(2, 10.0, 100.0, 15.0) == pytest.approx(1.5)  # the lower ceiling
    assert best_ratio(2, 10.0, None, 15.0) == pytest.approx(1.5)
    assert best_ratio(4, 10.0, 25.0) == pytest.approx(2.5)
    assert best_ratio(2, 22.0, 26.0) == pytest.approx(26 / 22)
    assert best_ratio(2, 10.0, None) == pytest.approx(2.0)
    assert best_ratio(2, None, 10.0) is None


def test_the_median_leaves_out_unknown_values() -> None:
    assert median_or_none([3.0, None, 1.0, 2.0]) == 2.0
    assert median_or_none([4.0, 1.0]) == 2.5
    assert median_or_none([None]) is None


def _seen(spec: Spec, files_s: float, steady: float, cpu: RunCpu) -> Observed:
    result = RunResult(spec, seconds=100 / files_s, first_s=1.0, n_files=100,
                       total_bytes=100 << 20, peak_rss=0, argv=[])
    return Observed(result, steady, cpu, "topic", "group", requests=250, max_in_flight=6,
                    beyond_ms=(12.0, 30.0), small_in_flight=4,
                    routes={"POST file": 100, "GET item": 150})


def test_the_tables_put_the_measured_ratio_next_to_the_best_the_machine_allows() -> None:
    one = Spec("ours", rekey=True, prefect_server=False)
    two = Spec("ours", rekey=True, prefect_server=False, processes=2)
    runs = {("joined", one): [_seen(one, 20.0, 22.0, _cpu(consumers=[4.0]))],
            ("joined", two): [_seen(two, 16.0, 18.0, _cpu(services={
                "girder": 4.0, "mongo": 4.0, "kafka": 1.0}))]}
    assert rate_of(runs, "joined", two) == pytest.approx(16.0)
    assert rate_of(runs, "joined", two, steady=True) == pytest.approx(18.0)
    assert rate_of(runs, "together", two) is None
    # ceiling 20 files/s (Girder's 25), one process 20 files/s: 2 can reach 1x at best
    assert best_of(runs, "joined", two, one) == pytest.approx(1.0)
    runs[("joined", two)][0].cpu.services["girder"] = 8.0  # Girder's ceiling 12.5 files/s
    assert best_of(runs, "joined", two, one) == pytest.approx(12.5 / 20)
    runs[("joined", two)][0].cpu.services["girder"] = 4.0
    facts = {one: [(0, 0, 2 << 20, 1 << 20, 8)], two: [(0, 0, 2 << 20, 1 << 20, 8)]}
    headers, rows = rate_rows(runs, facts, [one, two], one, None)
    row = dict(zip(headers, rows[1]))
    assert row["joined, then produced: files/s"] == "16.00"
    assert row["× 1 process (whole / steady)"].endswith("0.80× / 0.82×")
    assert row["best × 1 this machine allows"].endswith("1.00×")
    assert row["lag at the end: source / internal"] == "0 / 0"
    assert row["Girder requests per file / most in flight / most small-file uploads in "
               "flight in one process (joined)"] == "2.50 / 6 / 4"
    assert row["ms per request beyond the delay (Girder + proxy), p50 / p90 (joined)"] == \
        "12 / 30"
    assert row["internal topic MiB (× source)"] == "2.0 (2.00×)"
    table = "\n".join(cpu_table(runs, [one, two]))
    assert "5.0 (3.0 + 2.0)" in table  # the consumers' CPU, summed then each
    assert "| 20.0 |" in table  # the ceiling
    notes = routes_per_file(runs, [one, two])
    assert notes[1].endswith("`GET item` 1.50, `POST file` 1.00.")


def test_the_two_variants_run_the_specs_they_need() -> None:
    machine = Variant(10, "machine-bound", 120, CHUNK_SIZE, 20.0, True).specs(2)
    assert [(s.system, s.rekey, s.processes, s.n_threads) for s in machine] == [
        ("ours", False, 1, 2), ("ours", True, 1, 2), ("ours", True, 2, 2),
        ("ours", True, 4, 2), ("limit", False, 1, 2), ("limit", False, 1, 8)]
    latency = Variant(11, "latency-bound", 480, 16 << 10, 200.0, False).specs(2)
    assert [(s.system, s.processes, s.n_threads) for s in latency] == [
        ("ours", 1, 2), ("ours", 2, 2), ("ours", 4, 2), ("limit", 1, 8)]


def test_the_files_have_two_to_four_chunks_of_the_chosen_size(tmp_path) -> None:
    data = several_chunks_tree(tmp_path, 30, chunk_size=16 << 10)
    assert data.chunk_size == 16 << 10
    assert all(16 << 10 < size <= 64 << 10 for size in data.files.values())
    assert 2 * 30 <= data.chunks() <= 4 * 30
    assert (tmp_path / "run-0" / "f0000.bin").stat().st_size == data.files["run-0/f0000.bin"]


def test_the_producer_is_given_a_chunk_size_only_when_not_the_default(tmp_path,
                                                                      monkeypatch) -> None:
    seen = []

    def run(argv, **kwargs):
        seen.append(argv)
        kwargs["stdout"].write(b"produced 1 file(s)\n")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr("benchmarks.bench_data.subprocess.run", run)
    stack = type("S", (), {"env": lambda self: {}})()
    produce(stack, Dataset(tmp_path), "t", tmp_path / "p.log")
    produce(stack, Dataset(tmp_path, chunk_size=16384), "t", tmp_path / "p.log")
    assert "--chunk_size" not in seen[0]
    assert seen[1][-2:] == ["--chunk_size", "16384"]


def test_the_scale_out_options_reach_both_scenarios() -> None:
    assert 11 in SCENARIOS
    args = parse_args(["--only", "10,11", "--files-scale-files", "60",
                       "--files-scale-chunk-kib", "64", "--latency-scale-files", "100",
                       "--latency-scale-chunk-kib", "8", "--latency-scale-delay-ms", "50"])
    assert (args.only, args.files_scale_files, args.files_scale_chunk_kib) == ([10, 11], 60, 64)
    assert (args.latency_scale_files, args.latency_scale_chunk_kib,
            args.latency_scale_delay_ms) == (100, 8, 50.0)


def test_the_ceiling_on_a_shared_machine_counts_only_the_cores_others_left() -> None:
    # 18 CPU-s busy over 10 s on 2 cores, 15 measured: others took 3 CPU-s, 0.3 cores
    cpu = _cpu()
    assert cpu.ceiling_left == pytest.approx((2 - 0.3) / 0.1)
    assert _cpu(busy=math.nan).ceiling_left == pytest.approx(cpu.ceiling)
    assert _cpu(span_s=0.0).ceiling_left is None


def test_with_a_census_only_others_processes_and_steal_count_as_taken() -> None:
    outside = {"others": 1.5, "kernel threads": 1.0, "interrupts": 0.5, "steal": 0.5}
    cpu = _cpu(outside=outside)
    assert cpu.taken_by_others == pytest.approx(2.0)
    assert cpu.ceiling_left == pytest.approx((2 - 0.2) / 0.1)
    # never more than the machine was busy with beyond what was measured (3 CPU-s)
    assert _cpu(outside={**outside, "others": 600.0}).taken_by_others == pytest.approx(3.0)
    assert _cpu(outside=outside, busy=math.nan).taken_by_others == pytest.approx(2.0)


def test_the_census_splits_the_cpu_outside_the_run_by_whom() -> None:
    before = Census({(10, 1): (5.0, False), (11, 1): (1.0, True), (12, 1): (2.0, False)},
                    interrupts=3.0, steal=1.0)
    after = Census({(10, 1): (7.5, False), (11, 1): (1.4, True), (12, 1): (9.0, False),
                    (13, 5): (0.5, False), (10**7, 1): (50.0, False)},
                   interrupts=3.25, steal=1.5)
    split = spent(before, after, ours=[])
    # pid 12 is a process of its own; pid 13 started within the run; a pid reused
    # (another start time) or never seen before counts from 0
    assert split["others"] == pytest.approx(2.5 + 7.0 + 0.5 + 50.0)
    assert split["kernel threads"] == pytest.approx(0.4)
    assert (split["interrupts"], split["steal"]) == (0.25, 0.5)


def test_the_census_leaves_out_the_trees_it_is_told_are_ours() -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc on this system")
    before = take()
    sum(i * i for i in range(200_000))
    after = take()
    assert any(pid == os.getpid() for pid, _ in after.processes)
    mine = spent(before, after, ours=[os.getpid()])
    assert set(mine) == {"others", "kernel threads", "interrupts", "steal"}
    assert all(v >= 0 for v in mine.values())


def test_the_time_beyond_the_delay_is_read_from_the_proxys_latencies() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    p50, p90 = beyond_delay_ms([0.21, 0.205, 0.25, 0.201, 0.3], delay=0.2)
    assert p50 == pytest.approx(10.0)
    assert p90 == pytest.approx(100.0)
