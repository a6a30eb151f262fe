"""Scenario 7 of ``make bench`` (issue 14): a remote Girder. Every Girder request of
every system goes through :class:`~benchmarks.count_proxy.CountingProxy` with a fixed
delay (20 ms by default, ``--remote-delay-ms``), as a campus or cloud link would add;
the proxy also counts the requests, so each timed run gives its files/s and its
requests per file.

Small files (64 KiB) in the 3-level tree of scenario 1, on an 8-partition topic:
ours, OpenMSIStream 1.8.8 and the girder-client limit, each with ``--n_threads`` 2
and 8, and two processes of ours sharing one consumer group (each ``--n_threads`` 2),
against one. The proxy also gives the most requests it held at once and their
latencies. Then a slow Girder (200 ms per request, ``--remote-slow-delay-ms``): ours
and OpenMSIStream at ``--n_threads 2`` on fewer files, to show that ours does not
flood it (requests in flight, latency, errors).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.bench_common import KIB, Stat
from benchmarks.bench_config import Context
from benchmarks.bench_data import Dataset, small_tree, tree_of
from benchmarks.bench_report import Section, md_table, ratio
from benchmarks.bench_systems import RunResult, Spec, timed_run
from benchmarks.count_proxy import CountingProxy
from benchmarks.scenario_throughput import missing_notes

__all__ = ["scenario_remote", "remote_tree", "ProxyFacts"]

THREADS = (2, 8)


def remote_tree(root: Path, n_files: int, size: int, seed: int = 7) -> Dataset:
    """``n_files`` files of ``size`` bytes in ``l1-{0,1}/l2-{0..4}/`` (10 leaf folders)."""
    return tree_of(root, n_files, size, seed,
                   lambda i: f"l1-{(i % 10) // 5}/l2-{i % 5}/f{i:05d}.bin")


class ProxyFacts:
    """What the proxy saw in one run: requests by route, the most held at once,
    latencies (p50/p99, ms) and answers that were not 2xx/3xx/4xx (429, 5xx)."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.routes = Counter(proxy.counts)
        self.max_in_flight = proxy.max_in_flight
        lat = sorted(proxy.latencies) or [0.0]
        self.p50 = lat[len(lat) // 2] * 1000
        self.p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        self.errors = sum(n for status, n in proxy.statuses.items()
                          if status == 429 or status >= 500 or status == 0)


def _specs() -> list[Spec]:
    specs = [Spec(system, n) for system in ("ours", "omsi", "limit") for n in THREADS]
    return specs + [Spec("ours", THREADS[0], processes=2)]


def _run_all(ctx: Context, specs: list[Spec], data: Dataset, delay: float
             ) -> tuple[dict[Spec, list[RunResult]], dict[Spec, list[Counter]],
                        dict[Spec, list[ProxyFacts]]]:
    """Every spec once per repetition through a fresh delaying, counting proxy."""
    results: dict[Spec, list[RunResult]] = defaultdict(list)
    counts: dict[Spec, list[Counter]] = defaultdict(list)
    facts: dict[Spec, list[ProxyFacts]] = defaultdict(list)
    for rep in ctx.repetitions():
        topic = ctx.topic_with("remote", data, ctx.sizes.remote_partitions)
        for spec in specs[rep % len(specs):] + specs[:rep % len(specs)]:
            with CountingProxy(ctx.stack.girder_url, delay=delay) as proxy:
                result = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data,
                                   ctx.timeout_for(data.total_bytes) * 2, api_url=proxy.url,
                                   keep=ctx.keep)
                routes = Counter(proxy.counts)
                facts[spec].append(ProxyFacts(proxy))
            results[spec].append(result)
            counts[spec].append(routes)
            ctx.log(f"  {_label(spec)}: {result.seconds:.2f}s ({result.files_s:.1f} files/s, "
                    f"steady {result.steady_files_s or 0:.1f}), first file at "
                    f"{result.first_s:.2f}s, {sum(routes.values()) / data.n_files:.2f} "
                    f"requests/file, at most {facts[spec][-1].max_in_flight} in flight, "
                    f"{result.missing} missing, {result.duplicates} duplicate(s); load "
                    f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        ctx.drop_topic(topic)
    return results, counts, facts


def _label(spec: Spec) -> str:
    return f"{spec.label}, --n_threads {spec.n_threads}"


def scenario_remote(ctx: Context) -> Section:
    s = ctx.sizes
    delay = s.remote_delay_ms / 1000
    data = small_tree(ctx.work / "remote", s.remote_files, s.remote_size)
    section = Section(
        f"7. Remote Girder: {s.remote_delay_ms:g} ms added to every Girder request",
        f"{data.describe()} ({s.remote_size // KIB} KiB each, 3-level tree), "
        f"{s.remote_partitions} partitions, `--mode memory`. Every system talks to Girder "
        f"through a proxy that holds each request {s.remote_delay_ms:g} ms before "
        "forwarding it and counts it (start-up and folder requests included). Files/s "
        "from the (first) process's start to the last file in Girder; higher is better.")
    specs = _specs()
    load = os.getloadavg()
    results, counts, facts = _run_all(ctx, specs, data, delay)
    rate = {spec: Stat.of(r.files_s for r in results[spec]) for spec in specs}
    steady = {spec: Stat.of(r.steady_files_s for r in results[spec]) for spec in specs}
    per_file = {spec: Stat.of(sum(c.values()) / data.n_files for c in counts[spec])
                for spec in specs}
    omsi = {n: Spec("omsi", n) for n in THREADS}
    section.headers = ["system", "files/s", "files/s after the first file", "× OpenMSIStream "
                       "(same threads)", "× limit (same threads)", "× --n_threads 2",
                       "Girder requests / file", "most requests in flight",
                       "start → first file (s)", "missing / duplicates"]
    for spec in specs:
        runs = results[spec]
        two = Spec(spec.system, THREADS[0])
        section.rows.append([
            _label(spec), rate[spec].show(), steady[spec].show(),
            ratio(rate[spec], rate[omsi[spec.n_threads]]) if spec.system != "omsi" else "1",
            ratio(rate[spec], rate[Spec("limit", spec.n_threads)])
            if spec.system != "limit" else "1",
            ratio(rate[spec], rate[two]) if spec != two else "1",
            per_file[spec].show("{:.2f}"), str(max(f.max_in_flight for f in facts[spec])),
            Stat.of(r.first_s for r in runs).show("{:.2f}"),
            f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}"])
    section.extra = _routes(specs, counts, data.n_files)
    section.notes = missing_notes(results) + [
        f"Load average (1, 5, 15 min) at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
    slow_rows, slow_line, slow_results = _slow_girder(ctx)
    section.extra += slow_rows
    ours2, ours8, two_procs = Spec("ours", 2), Spec("ours", 8), specs[-1]
    section.headline = [
        f"{s.remote_delay_ms:g} ms per request: ours `--n_threads 2` "
        f"{rate[ours2].median:.1f} files/s = {ratio(rate[ours2], rate[omsi[2]])} "
        f"OpenMSIStream (goal ≥ 4×); `--n_threads 8` {ratio(rate[ours8], rate[ours2])} "
        f"`--n_threads 2` (goal ≥ 3×); 2 processes {ratio(rate[two_procs], rate[ours2])} one "
        f"(goal ≥ 1.8×); {per_file[ours2].median:.2f} Girder requests per file "
        f"(OpenMSIStream {per_file[omsi[2]].median:.2f}, limit "
        f"{per_file[Spec('limit', 2)].median:.2f}).", slow_line]
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {_label(spec)}"] + results[spec][0].argv
    for spec, runs in slow_results.items():
        section.commands += [f"# slow Girder: {_label(spec)}"] + runs[0].argv
    shutil.rmtree(data.root, ignore_errors=True)
    return section


def _slow_girder(ctx: Context) -> tuple[list[str], str, dict[Spec, list[RunResult]]]:
    """Ours and OpenMSIStream at ``--n_threads 2`` with a slow Girder: the table rows,
    the headline and the runs."""
    s = ctx.sizes
    data = small_tree(ctx.work / "remote-slow", s.remote_slow_files, s.remote_size, seed=8)
    specs = [Spec("ours", THREADS[0]), Spec("omsi", THREADS[0])]
    results, _, facts = _run_all(ctx, specs, data, s.remote_slow_delay_ms / 1000)
    rate = {spec: Stat.of(r.files_s for r in results[spec]) for spec in specs}
    rows = [[_label(spec), rate[spec].show(),
             ratio(rate[spec], rate[specs[1]]) if spec != specs[1] else "1",
             str(max(f.max_in_flight for f in facts[spec])),
             Stat.of(f.p50 for f in facts[spec]).show("{:.0f}"),
             Stat.of(f.p99 for f in facts[spec]).show("{:.0f}"),
             str(sum(f.errors for f in facts[spec]))] for spec in specs]
    shutil.rmtree(data.root, ignore_errors=True)
    ours = facts[specs[0]]
    line = (f"slow Girder ({s.remote_slow_delay_ms:g} ms): ours `--n_threads 2` "
            f"{ratio(rate[specs[0]], rate[specs[1]])} OpenMSIStream, at most "
            f"{max(f.max_in_flight for f in ours)} requests in flight (limit "
            "`--max_parallel_uploads` 16), request latency p99 "
            f"{Stat.of(f.p99 for f in ours).median:.0f} ms.")
    return ([f"A slow Girder: {s.remote_slow_delay_ms:g} ms added to every request, "
             f"{data.describe()}, `--n_threads 2` (latencies are the proxy's, delay "
             "included; errors are answers 429/5xx or none):", "",
             md_table(["system", "files/s", "× OpenMSIStream", "most requests in flight",
                       "latency p50 (ms)", "latency p99 (ms)", "errors"], rows), ""],
            line, results)


def _routes(specs: list[Spec], counts: dict[Spec, list[Counter]], n_files: int) -> list[str]:
    """Requests per file by route, from each system's first ``--n_threads 2`` run."""
    shown = [spec for spec in specs if spec.n_threads == THREADS[0] and spec.processes == 1]
    first = {spec: counts[spec][0] for spec in shown}
    routes = sorted({r for c in first.values() for r in c},
                    key=lambda r: -max(c.get(r, 0) for c in first.values()))
    rows = [[f"`{route}`"] + [f"{first[spec].get(route, 0) / n_files:.2f}" for spec in shown]
            for route in routes[:12]]
    return ["Girder requests per file, by route (the first `--n_threads 2` run of each):", "",
            md_table(["route"] + [spec.label for spec in shown], rows), ""]
