"""Scenarios 1-3 of issue 6: how fast files get into Girder, and at what memory cost.

1. Many small files (1,000 x 64 KiB in a 3-level tree): files/s, Girder requests per
   file (counted in a separate, untimed pass through :mod:`benchmarks.count_proxy`),
   Prefect task runs and Prefect database growth per 1,000 files.
2. A few big files (8 x 256 MiB): MB/s and peak RSS, in ``memory`` and ``disk`` mode.
3. One huge file (2 GiB) in ``disk`` mode: MB/s and peak RSS.

Each repetition produces the data to a fresh topic once; every system then consumes it
into its own fresh collection, in an order rotated from one repetition to the next so
that no system always runs first (page cache, Girder's warm-up).
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict

from benchmarks.bench_common import MIB, Stat
from benchmarks.bench_config import Context
from benchmarks.bench_data import Dataset, big_files, small_tree
from benchmarks.bench_report import Section, md_table, ratio
from benchmarks.bench_systems import RunResult, Spec, timed_run
from benchmarks.count_proxy import CountingProxy

__all__ = ["run_matrix", "missing_notes", "scenario_small_files", "scenario_big_files",
           "scenario_huge_file"]


def run_matrix(ctx: Context, specs: list[Spec], data: Dataset, prefix: str,
               partitions: int | None = None) -> dict[Spec, list[RunResult]]:
    """Every spec once per repetition, each repetition on a fresh topic."""
    results: dict[Spec, list[RunResult]] = defaultdict(list)
    for rep in ctx.repetitions():
        topic = ctx.topic_with(prefix, data, partitions)
        order = specs[rep % len(specs):] + specs[:rep % len(specs)]
        for spec in order:
            result = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data,
                               ctx.timeout_for(data.total_bytes), keep=ctx.keep)
            ctx.log(f"  {spec.label}: {result.seconds:.2f}s ({result.files_s:.1f} files/s, "
                    f"{result.mb_s:.1f} MB/s), first file at {result.first_s:.2f}s, peak RSS "
                    f"{result.peak_rss / MIB:.0f} MiB, {result.missing} missing, "
                    f"{result.duplicates} duplicate(s)")
            results[spec].append(result)
        ctx.drop_topic(topic)
    return results


def _commands(results: dict[Spec, list[RunResult]], ctx: Context) -> list[str]:
    lines = [f"# {' '.join(ctx.argv)}"]
    for spec, runs in results.items():
        lines += [f"# {spec.label}"] + runs[0].argv
    return lines


def missing_notes(results: dict[Spec, list[RunResult]]) -> list[str]:
    """A note for every system that left files out of Girder in some run."""
    notes = []
    for spec, runs in results.items():
        missing = sum(r.missing for r in runs)
        if missing:
            bad = [r for r in runs if r.missing]
            hint = next((r.failure for r in bad if r.failure), None)
            notes.append(f"{spec.label}: {missing} file(s) never reached Girder in "
                         f"{len(bad)} of {len(runs)} run(s) (the harness gave up after a long "
                         "time without a new file); its rates count only the files that "
                         f"arrived. {'; '.join(bad[0].missing_detail)}."
                         + (f" Its log: `{hint}`" if hint else ""))
    return notes


def _stat(runs: list[RunResult], attr: str) -> Stat:
    return Stat.of(getattr(r, attr) for r in runs)


def _dups(runs: list[RunResult]) -> str:
    """``missing / duplicates`` summed over the repetitions."""
    return f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}"


def scenario_small_files(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        f"1. Small files: {s.small_files:,} files of {s.small_size // 1024} KiB in a 3-level tree",
        f"`--n_threads {s.n_threads}`, `--mode memory`, {s.partitions} partitions. Higher files/s "
        "is better; ratios > 1 mean faster than the baseline. Girder requests per file come "
        "from one extra, untimed run of each system through a counting proxy (start-up "
        "requests included, so they weigh more in small runs). Prefect figures are for our "
        "consumer only: task runs the server recorded for its flow run, and the growth of "
        "the server's SQLite database (live pages), both per 1,000 files.")
    data = small_tree(ctx.work / "small", s.small_files, s.small_size)
    specs = [Spec("ours", s.n_threads), Spec("omsi", s.n_threads), Spec("limit", s.n_threads)]
    results = run_matrix(ctx, specs, data, "small")
    count_notes: list[str] = []
    counts = _count_requests(ctx, specs, data, count_notes)
    omsi, limit = results[specs[1]], results[specs[2]]
    section.headers = ["system", "files/s", "× OpenMSIStream", "× limit",
                       "files/s after the first file", "start → first file (s)",
                       "Girder requests / file", "Prefect task runs / 1,000 files",
                       "Prefect DB growth / 1,000 files", "peak RSS (MiB)",
                       "missing / duplicates"]
    per_k = 1000 / data.n_files
    for spec in specs:
        runs = results[spec]
        rate = _stat(runs, "files_s")
        ours = spec.system == "ours"
        section.rows.append([
            spec.label, rate.show(),
            ratio(rate, _stat(omsi, "files_s")) if spec.system != "omsi" else "1",
            ratio(rate, _stat(limit, "files_s")) if spec.system != "limit" else "1",
            _stat(runs, "steady_files_s").show(), _stat(runs, "first_s").show("{:.2f}"),
            f"{counts[spec].total / data.n_files:.2f}" if spec in counts else "n/a",
            Stat.of(r.task_runs * per_k for r in runs if r.task_runs is not None).show("{:.0f}")
            if ours else "–",
            Stat.of(r.db_growth / MIB * per_k for r in runs if r.db_growth is not None)
            .show("{:.2f} MiB") if ours else "–",
            Stat.of(r.peak_rss / MIB for r in runs).show("{:.0f}"), _dups(runs)])
    section.extra = _request_breakdown(counts, data.n_files)
    section.notes = missing_notes(results) + count_notes
    ours = results[specs[0]]
    req = {spec.system: counts[spec].total / data.n_files for spec in counts}
    section.headline = [
        f"{_stat(ours, 'files_s').median:.1f} files/s: "
        f"{ratio(_stat(ours, 'files_s'), _stat(omsi, 'files_s'))} OpenMSIStream, "
        f"{ratio(_stat(ours, 'files_s'), _stat(limit, 'files_s'))} the girder-client limit; "
        f"{req.get('ours', float('nan')):.2f} Girder requests per file "
        f"(OpenMSIStream {req.get('omsi', float('nan')):.2f}, limit "
        f"{req.get('limit', float('nan')):.2f})."]
    section.commands = _commands(results, ctx)
    shutil.rmtree(data.root, ignore_errors=True)
    return section


def _count_requests(ctx: Context, specs: list[Spec], data: Dataset,
                    notes: list[str]) -> dict[Spec, CountingProxy]:
    """One untimed run of each spec through a counting proxy; the proxies' counts."""
    counted: dict[Spec, CountingProxy] = {}
    topic = ctx.topic_with("count", data)
    for spec in specs:
        with CountingProxy(ctx.stack.girder_url) as proxy:
            run = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data,
                            ctx.timeout_for(data.total_bytes) * 2, api_url=proxy.url,
                            keep=ctx.keep)
            counted[spec] = proxy
            if run.missing:
                notes.append(f"In the counted pass, {spec.label} left {run.missing} file(s) out "
                             "of Girder; its requests are still divided by all the files."
                             + (f" Its log: `{run.failure}`" if run.failure else ""))
            ctx.log(f"  {spec.label}: {proxy.total} Girder requests "
                    f"({proxy.total / data.n_files:.2f} per file)")
    ctx.drop_topic(topic)
    return counted


def _request_breakdown(counts: dict[Spec, CountingProxy], n_files: int) -> list[str]:
    routes = sorted({r for p in counts.values() for r in p.counts},
                    key=lambda r: -max(p.counts.get(r, 0) for p in counts.values()))
    if not routes:
        return []
    specs = list(counts)
    rows = [[f"`{route}`"] + [f"{counts[s].counts.get(route, 0) / n_files:.2f}" for s in specs]
            for route in routes[:12]]
    return ["Girder requests per file, by route (the counted pass):", "",
            md_table(["route"] + [s.label for s in specs], rows), ""]


def _size_table(section: Section, results: dict[Spec, list[RunResult]]) -> None:
    """MB/s and peak RSS rows, each compared with OpenMSIStream in the same mode."""
    limit = next(runs for spec, runs in results.items() if spec.system == "limit")
    omsi = {spec.mode: runs for spec, runs in results.items() if spec.system == "omsi"}
    section.headers = ["system", "MB/s", "× OpenMSIStream (same mode)", "× limit",
                       "MB/s first message → last file", "× limit (first message → last file)",
                       "start-up: start → first message (s)",
                       "MB/s after the first file", "peak RSS (MiB)",
                       "RSS × OpenMSIStream (same mode)", "start → first file (s)",
                       "Girder uploads open at once", "missing / duplicates"]
    for spec, runs in results.items():
        rate = _stat(runs, "mb_s")
        rss = Stat.of(r.peak_rss / MIB for r in runs)
        base = omsi.get(spec.mode) if spec.system == "ours" else None
        active = _stat(runs, "active_mb_s") if spec.system == "ours" else None
        section.rows.append([
            spec.label, rate.show(), ratio(rate, _stat(base, "mb_s")) if base else "–",
            ratio(rate, _stat(limit, "mb_s")) if spec.system != "limit" else "1",
            active.show() if active else "–",
            ratio(active, _stat(limit, "mb_s")) if active else "–",
            _stat(runs, "startup_s").show("{:.2f}") if active else "–",
            _stat(runs, "steady_mb_s").show(), rss.show("{:.0f}"),
            ratio(rss, Stat.of(r.peak_rss / MIB for r in base)) if base else "–",
            _stat(runs, "first_s").show("{:.2f}"),
            Stat.of(r.uploads_in_flight for r in runs if r.uploads_in_flight is not None)
            .show("{:.0f}") if active else "–", _dups(runs)])
        if base:
            section.headline.append(
                f"{spec.label}: {rate.median:.1f} MB/s, {ratio(rate, _stat(base, 'mb_s'))} "
                f"OpenMSIStream and {ratio(rate, _stat(limit, 'mb_s'))} the limit; peak RSS "
                f"{rss.median:.0f} MiB, {ratio(rss, Stat.of(r.peak_rss / MIB for r in base))} "
                "OpenMSIStream's.")
    section.notes = missing_notes(results)


def scenario_big_files(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        f"2. Big files: {s.big_files} files of {s.big_size // MIB} MiB, memory and disk mode",
        f"`--n_threads {s.n_threads}`, {s.big_partitions} partitions, 512 KiB chunks. MB/s: "
        "higher is better. Peak RSS of the consumer's process tree, sampled every 0.2 s from "
        "/proc: lower is better (RSS ratios < 1 mean less memory than OpenMSIStream).")
    data = big_files(ctx.work / "big", s.big_files, s.big_size)
    specs = [Spec("ours", s.n_threads, "memory", budget_mb=256),
             Spec("ours", s.n_threads, "memory", budget_mb=1024), Spec("ours", s.n_threads, "disk"),
             Spec("omsi", s.n_threads, "memory"), Spec("omsi", s.n_threads, "disk"),
             Spec("limit", s.n_threads)]
    results = run_matrix(ctx, specs, data, "big", s.big_partitions)
    _size_table(section, results)
    section.commands = _commands(results, ctx)
    shutil.rmtree(data.root, ignore_errors=True)
    return section


def scenario_huge_file(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        f"3. One huge file: {s.huge_size // MIB:,} MiB in disk mode",
        f"`--n_threads {s.n_threads}`, `--mode disk`, {s.big_partitions} partitions. "
        "The point is the peak RSS: a file rebuilt on disk should not be held in memory.")
    started = time.monotonic()
    data = big_files(ctx.work / "huge", 1, s.huge_size, seed=3)
    ctx.log(f"wrote {data.describe()} in {time.monotonic() - started:.0f}s")
    specs = [Spec("ours", s.n_threads, "disk"), Spec("omsi", s.n_threads, "disk"),
             Spec("limit", s.n_threads)]
    results = run_matrix(ctx, specs, data, "huge", s.big_partitions)
    _size_table(section, results)
    section.commands = _commands(results, ctx)
    shutil.rmtree(data.root, ignore_errors=True)
    return section
