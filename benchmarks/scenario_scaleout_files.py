"""Scenarios 10 and 11 of ``make bench`` (issue 23): scale-out with files of several
chunks, and where its ceiling is.

Scenario 10, *machine-bound*, as a user scaling out would: 120 files of 2 to 4 chunks
of OpenMSIStream's default 512 KiB, 4 partitions, Girder 20 ms away (every request
through :class:`~benchmarks.count_proxy.CountingProxy` with a delay), and 1, 2 and 4
processes of one consumer group with ``--rekey_by_file``, plus 1 process without it.
Without the option, the chunks of one file are spread over the partitions (the
producer keys each chunk by path and chunk number), so the members of a group each
hold part of each file: issue 23 saw two processes upload 56 of 120 files, then stand
still for the stale timeout. With it, each process's first hop re-produces its share of
the source topic to ``<topic>--<group>--by-file`` keyed by file, and its second hop
rebuilds the files of its share of that topic. On a machine of two cores that also
runs Kafka, Girder, its database and the proxy, those take most of the cores: the
section prints where the CPU went in every run and the ceiling it implies
(:mod:`benchmarks.scaleout_figures`), so a ratio of 2 processes to 1 reads against the
best ratio this machine allows.

Scenario 11, *latency-bound*: the same with small chunks (16 KiB), Girder 200 ms away
and more files (480), so that one process is bound by its own concurrency (round trips
to Girder) rather than by the cores, and N processes should scale.

Each spec runs twice per repetition (:func:`~benchmarks.scaleout_runs.observed_run`):
*started together* on the full topic and *joined, then produced*. Per run: files/s
over the whole run and between 10% and 90% of the files landed, duplicates and missing
items, and, after the processes stopped, the group's lag at the end of both topics
(end offsets minus the committed ones: 0 when every message is accounted for). The
cost of the option for one process (scenario 10): files/s on against off, and the
broker bytes of the internal topic. The processes run without a Prefect server (a
command-line user's default), so that the cores go to the consumers, Kafka and Girder.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_common import KIB
from benchmarks.bench_config import Context
from benchmarks.bench_data import CHUNK_SIZE, Dataset, write_random
from benchmarks.bench_girder import delete_topics
from benchmarks.bench_report import Section
from benchmarks.bench_systems import Spec
from benchmarks.scaleout_report import (MODES, best_of, ceiling_of, cpu_table, rate_of,
                                        rate_rows, routes_per_file, show)
from benchmarks.scaleout_runs import SUFFIX, Observed, observed_run, run_facts
from benchmarks.scenario_throughput import missing_notes

__all__ = ["Variant", "scenario_scaleout_files", "scenario_scaleout_latency",
           "several_chunks_tree"]


@dataclass(frozen=True)
class Variant:
    """What one of the two scenarios runs: its files, their chunks, Girder's distance,
    and whether it runs one process without the option and the limit with as many
    threads as one process of ours (the machine-bound scenario's cost of the option)."""

    number: int
    name: str
    n_files: int
    chunk_size: int
    delay_ms: float
    with_plain: bool

    def specs(self, n: int) -> list[Spec]:
        """Ours with the option in 1, 2 and 4 processes (and 1 without it); then the
        girder-client limit with as many upload threads as 4 processes of ours (and 1)."""
        plain = Spec("ours", n, prefect_server=False)
        rekeyed = [Spec("ours", n, prefect_server=False, rekey=True, processes=k)
                   for k in (1, 2, 4)]
        limits = [Spec("limit", n)] if self.with_plain else []
        return ([plain] if self.with_plain else []) + rekeyed + limits + [Spec("limit", 4 * n)]


def several_chunks_tree(root: Path, n_files: int, chunk_size: int = CHUNK_SIZE,
                        seed: int = 23) -> Dataset:
    """``n_files`` files of 2 to 4 chunks of ``chunk_size`` (sizes drawn uniformly in
    between, seeded) in ``run-{0..4}/``."""
    rng = random.Random(seed)
    data = Dataset(root, chunk_size=chunk_size)
    for i in range(n_files):
        rel, size = f"run-{i % 5}/f{i:04d}.bin", rng.randint(chunk_size + 1, 4 * chunk_size)
        write_random(root / rel, size, seed * 1_000_003 + i)
        data.files[rel] = size
    return data


def _log(ctx: Context, spec: Spec, mode: str, seen: Observed, fact: tuple | None) -> None:
    r, cpu = seen.result, seen.cpu
    text = (f"  {spec.label}, {mode}: {r.seconds:.2f}s ({r.files_s:.2f} files/s, steady "
            f"{show(seen.steady)}), {r.missing} missing, {r.duplicates} duplicate(s); "
            f"{seen.requests} Girder requests, at most {seen.max_in_flight} at once, "
            f"{show(seen.beyond_ms[0], '{:.0f}')} ms p50 beyond the delay; CPU-s "
            f"ours {cpu.consumers_total:.1f} girder+db {cpu.girder_db:.1f} "
            f"not-ours {cpu.not_consumers:.1f}, busy {cpu.busy:.0%}, ceiling "
            f"{show(cpu.ceiling, '{:.1f}')} files/s")
    if fact is not None:
        text += f"; lag at the end {fact[0]} / {fact[1]}; internal topic {fact[2]} bytes"
    ctx.log(text + f"; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if seen.evidence:
        ctx.log(f"  {spec.label}, {mode}: {seen.evidence}")


def _run(ctx: Context, specs: list[Spec], data: Dataset, delay: float
         ) -> tuple[dict[tuple[str, Spec], list[Observed]], dict[Spec, list[tuple]]]:
    """Every spec twice per repetition (the limit once: no Kafka), each run with its
    own group and collection through a fresh delaying proxy: ``together`` on the
    repetition's topic, ``joined`` on a fresh one. Facts per run: :func:`run_facts`."""
    runs: dict[tuple[str, Spec], list[Observed]] = defaultdict(list)
    facts: dict[Spec, list[tuple]] = defaultdict(list)
    for rep in ctx.repetitions():
        topic = ctx.topic_with("files", data, ctx.sizes.files_scale_partitions)
        for spec in specs[rep % len(specs):] + specs[:rep % len(specs)]:
            modes = ("together",) if spec.system == "limit" else ("together", "joined")
            for mode in modes:
                seen = observed_run(ctx, spec, data, delay, topic if mode == "together"
                                    else None)
                runs[(mode, spec)].append(seen)
                fact = None
                if spec.system != "limit":
                    facts[spec].append(fact := run_facts(ctx, spec, seen.topic, seen.group))
                    if spec.rekey and not ctx.keep:
                        delete_topics(ctx.stack, [f"{seen.topic}--{seen.group}{SUFFIX}"])
                    if mode == "joined":
                        ctx.drop_topic(seen.topic)
                _log(ctx, spec, mode, seen, fact)
        ctx.drop_topic(topic)
    return runs, facts


def _versus_one(runs, mode: str, spec: Spec, one: Spec) -> str:
    """``spec``'s ratio to one process in ``mode``, the best the machine allowed it and
    the ceiling behind that."""
    rate, base = rate_of(runs, mode, spec), rate_of(runs, mode, one)
    return (f"{spec.processes} processes {show(rate / base if rate and base else None, '{:.2f}×')}"
            f" (this machine allows ≤ {show(best_of(runs, mode, spec, one), '{:.2f}×')}: "
            f"ceiling {show(ceiling_of(runs, mode, spec), '{:.1f}')} files/s)")


def _headline(runs, variant: Variant, specs: list[Spec]) -> list[str]:
    """One line: the ratios to one process next to the best ones the machine allowed,
    duplicates and missing items, and (machine-bound) the cost of the option."""
    one, two, four = specs[1:4] if variant.with_plain else specs[:3]
    parts = [f"{name}: one process {show(rate_of(runs, mode, one))} files/s, "
             + ", ".join(_versus_one(runs, mode, k, one) for k in (two, four))
             for mode, name in (("joined", "joined then produced"),
                                ("together", "started together"))]
    observed = [o.result for got in runs.values() for o in got]
    line = (f"`--rekey_by_file`, {variant.name}: " + "; ".join(parts) + " (goal for 2: ≥ "
            f"1.8×); {sum(r.duplicates for r in observed)} duplicate and "
            f"{sum(r.missing for r in observed)} missing item(s) in all")
    if variant.with_plain:
        plain, base = rate_of(runs, "joined", specs[0]), rate_of(runs, "joined", one)
        line += (f"; one process with the option: "
                 f"{show(base / plain if base and plain else None, '{:.2f}×')} the files/s "
                 "without it, and every chunk written twice to the broker")
    limit = specs[-1]
    return [line + f". The girder-client limit with {limit.n_threads} threads: "
            f"{show(rate_of(runs, 'together', limit))} files/s."]


def _notes(runs, variant: Variant, specs: list[Spec]) -> list[str]:
    load = os.getloadavg()
    flight = [o.small_in_flight for got in runs.values() for o in got if o.small_in_flight]
    notes = missing_notes({s: [o.result for m in ("together", "joined")
                               for o in runs.get((m, s), [])] for s in specs}) + [
        "Best × 1 this machine allows: min(ceiling, Girder's ceiling, N × one process's "
        "files/s) ÷ one process's files/s (per run, medians; the ceilings in the CPU "
        f"table). The ceiling is {os.cpu_count()} cores ÷ the CPU-seconds per file of "
        "everything measured but the processes under test (Girder, its database, Kafka, "
        "the producer when it runs inside the span, and the benchmark's own process, in "
        "which the delaying proxy runs as threads): what the machine could upload if our "
        "consumers cost nothing. Girder's ceiling is 1 core ÷ Girder's CPU-seconds per "
        "file: Girder is one Python process, its threads share one interpreter lock. Both "
        "are measured in the run itself, so Girder work that more processes cause per "
        "file (more requests per file) lowers them. "
        "Not measured: from a census of /proc at the run's start and end (within a few "
        "tenths of a second of the span): the CPU of processes outside this benchmark and "
        "the stack (other users of a shared machine; their own time, processes alive at "
        "the end: a lower bound), of the kernel's threads, in interrupts, and stolen by "
        "the hypervisor.",
        "Steady files/s: files between the moment 10% of them had landed in Girder and "
        "the moment 90% had (Girder's timestamps), over the time between: start-up, the "
        "groups' first rebalances and the last stragglers left out.",
        "The girder-client limit uploads the same files from disk with a thread pool and "
        "a client per thread, through the same delaying proxy: what this Girder takes from "
        "a client that does nothing but upload. Most small-file uploads one process of "
        f"ours had open at once: {max(flight) if flight else '–'} (its adaptive limit, at "
        "most `--max_parallel_uploads`, 16 by default).",
        "Ceiling with the cores others left: the same with the cores minus what others' "
        "processes and the hypervisor took over the run, what a shared machine allowed "
        "that run.",
        f"Measured on a shared machine ({os.cpu_count()} cores shared with Kafka, Girder, "
        "the proxy and other engineers' test runs): to be re-measured. Load average (1, 5, "
        f"15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
    notes += routes_per_file(runs, specs, "joined") + routes_per_file(runs, specs, "together")
    notes += [f"{s.label}, {MODES[m]}: {o.evidence}." for (m, s), got in runs.items()
              for o in got if o.evidence]
    return notes


def _scenario(ctx: Context, variant: Variant) -> Section:
    n = ctx.sizes.n_threads
    data = several_chunks_tree(ctx.work / f"files-{variant.number}", variant.n_files,
                               variant.chunk_size)
    chunk = (f"{variant.chunk_size // KIB} KiB" if variant.chunk_size % KIB == 0
             else f"{variant.chunk_size} bytes")
    section = Section(
        f"{variant.number}. Scale-out with files of several chunks, {variant.name}: 1, 2 "
        f"and 4 processes of one group, Girder {variant.delay_ms:g} ms away",
        f"{data.describe()} (2 to 4 chunks of {chunk} each), "
        f"{ctx.sizes.files_scale_partitions} partitions, `--n_threads {n}` per process, "
        f"`--mode memory`, no Prefect server; every Girder request through a proxy that "
        f"holds it {variant.delay_ms:g} ms. The processes of one run share a consumer "
        "group. *Started together*: they start at once on the full topic, files/s from the "
        "first start to the last file in Girder (start-up and the group's first "
        "rebalances included). *Joined, then produced*: they start on an empty topic; once "
        "each holds partitions of both hops, the files are produced, files/s from the start "
        "of the produce to the last file in Girder (a running deployment). Higher is "
        "better. Lag at the end: messages past the group's committed offsets once the "
        "processes stopped, on the source topic / on the internal topic, over every run "
        "(0 / 0: all committed). Internal topic: its log segments on the broker's disk.")
    specs = variant.specs(n)
    runs, facts = _run(ctx, specs, data, variant.delay_ms / 1000)
    one = specs[1] if variant.with_plain else specs[0]
    section.headers, section.rows = rate_rows(runs, facts, specs, one,
                                              specs[0] if variant.with_plain else None)
    section.extra = cpu_table(runs, specs)
    section.headline = _headline(runs, variant, specs)
    section.notes = _notes(runs, variant, specs)
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {spec.label}"] + runs[("together", spec)][0].result.argv
    shutil.rmtree(data.root, ignore_errors=True)
    return section


def scenario_scaleout_files(ctx: Context) -> Section:
    """Scenario 10: the machine-bound variant (``--files-scale-*`` options)."""
    s = ctx.sizes
    return _scenario(ctx, Variant(10, "machine-bound", s.files_scale_files,
                                  s.files_scale_chunk_kib * KIB, s.files_scale_delay_ms, True))


def scenario_scaleout_latency(ctx: Context) -> Section:
    """Scenario 11: the latency-bound variant (``--latency-scale-*`` options)."""
    s = ctx.sizes
    return _scenario(ctx, Variant(11, "latency-bound", s.latency_scale_files,
                                  s.latency_scale_chunk_kib * KIB, s.latency_scale_delay_ms,
                                  False))
