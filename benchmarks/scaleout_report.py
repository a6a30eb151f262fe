"""The tables of scenarios 10 and 11 of ``make bench`` (issue 23): the rates of each
spec with the ratio to one process next to the best ratio the machine allows, and where
the CPU went in every run (:class:`~benchmarks.scaleout_figures.RunCpu`).

Every cell is the median of the repetitions (``–``: not measured).
"""

from __future__ import annotations

from benchmarks.bench_common import MIB, Stat
from benchmarks.bench_report import md_table
from benchmarks.bench_systems import Spec
from benchmarks.scaleout_figures import best_ratio, median_or_none
from benchmarks.scaleout_runs import Observed

__all__ = ["MODES", "rate_of", "ceiling_of", "best_of", "rate_rows", "cpu_table", "show",
           "routes_per_file"]

MODES = {"together": "started together", "joined": "joined, then produced"}
Runs = dict[tuple[str, Spec], list[Observed]]


def show(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value and base else "–"


def _distinct(values: list, fmt=str) -> str:
    """The values of the repetitions, each once (``–``: none known)."""
    shown = list(dict.fromkeys(fmt(v) for v in values if v is not None))
    return " / ".join(shown) if shown else "–"


def rate_of(runs: Runs, mode: str, spec: Spec | None, steady: bool = False) -> float | None:
    """Median files/s of ``spec``'s runs in ``mode`` (whole run, or steady state)."""
    if spec is None:
        return None
    return median_or_none(o.steady if steady else o.result.files_s
                          for o in runs.get((mode, spec), []))


def ceiling_of(runs: Runs, mode: str, spec: Spec) -> float | None:
    """Median of the runs' ceilings: the lower of what the cores allow with free
    consumers and what Girder's one process allows."""
    return median_or_none(min((c for c in (o.cpu.ceiling, o.cpu.girder_ceiling)
                               if c is not None), default=None)
                          for o in runs.get((mode, spec), []))


def best_of(runs: Runs, mode: str, spec: Spec, one: Spec | None) -> float | None:
    """The best ratio to one process that the machine allowed ``spec`` in ``mode``."""
    return best_ratio(spec.processes, rate_of(runs, mode, one), ceiling_of(runs, mode, spec))


def _mode_cells(runs: Runs, mode: str, spec: Spec, one: Spec | None) -> list[str]:
    whole, steady = rate_of(runs, mode, spec), rate_of(runs, mode, spec, True)
    cells = [show(whole), show(steady)]
    if not spec.rekey or one is None:
        return cells + ["–", "–"]
    return cells + [f"{_ratio(whole, rate_of(runs, mode, one))} / "
                    f"{_ratio(steady, rate_of(runs, mode, one, True))}",
                    show(best_of(runs, mode, spec, one), "{:.2f}×")]


def rate_rows(runs: Runs, facts: dict[Spec, list[tuple]], specs: list[Spec],
              one: Spec, plain: Spec | None) -> tuple[list[str], list[list[str]]]:
    """The headers and rows of the rates table."""
    headers = ["system"]
    for mode in MODES.values():
        headers += [f"{mode}: files/s", "steady files/s (10–90%)",
                    "× 1 process (whole / steady)", "best × 1 this machine allows"]
    headers += ["Girder requests per file / most in flight / most small-file uploads in "
                "flight in one process (joined)",
                "ms per request beyond the delay (Girder + proxy), p50 / p90 (joined)",
                "× 1 process without the option (joined)", "missing / duplicates",
                "lag at the end: source / internal", "internal topic MiB (× source)",
                "internal topic messages"]
    rows = []
    for spec in specs:
        observed = [o.result for mode in MODES for o in runs.get((mode, spec), [])]
        row = [spec.label + (f", {spec.n_threads} threads" if spec.system == "limit" else "")]
        for mode in MODES:
            row += (_mode_cells(runs, mode, spec, one) if (mode, spec) in runs
                    else ["–"] * 4)
        lost = (f"{sum(r.missing for r in observed)} / "
                f"{sum(r.duplicates for r in observed)}")
        row += _requests(runs.get(("together" if spec.system == "limit" else "joined",
                                   spec), []))
        if spec.system == "limit":
            rows.append(row + ["–", lost, "–", "–", "–"])
            continue
        fs = facts.get(spec, [])
        row += [_ratio(rate_of(runs, "joined", spec), rate_of(runs, "joined", plain))
                if plain is not None and spec != plain else "–", lost,
                f"{_distinct([f[0] for f in fs])} / {_distinct([f[1] for f in fs])}"]
        row += ([f"{_distinct([f[2] for f in fs], lambda b: f'{b / MIB:.1f}')} "
                 f"({_distinct([f[2] / f[3] for f in fs if f[2] and f[3]], '{:.2f}×'.format)})",
                 _distinct([f[4] for f in fs])] if spec.rekey else ["–", "–"])
        rows.append(row)
    return headers, rows


def _requests(runs: list[Observed]) -> list[str]:
    """Two cells (medians): Girder requests per file through the proxy, the most it held
    at once and the most small-file uploads one process had open; the time per request
    beyond the delay."""
    per_file = _med(runs, lambda o: o.requests / o.result.n_files if o.result.n_files else None)
    return [f"{show(per_file, '{:.2f}')} / {show(_med(runs, lambda o: o.max_in_flight), '{:.0f}')}"
            f" / {show(_med(runs, lambda o: o.small_in_flight), '{:.0f}')}",
            f"{show(_med(runs, lambda o: o.beyond_ms[0]), '{:.0f}')} / "
            f"{show(_med(runs, lambda o: o.beyond_ms[1]), '{:.0f}')}"]


def _med(runs: list[Observed], figure) -> float | None:
    return median_or_none(figure(o) for o in runs)


def _consumers(runs: list[Observed]) -> str:
    """Median CPU-s of the processes under test, summed, then each process's."""
    total = _med(runs, lambda o: o.cpu.consumers_total)
    n = max(len(o.cpu.consumers) for o in runs)
    if n < 2:
        return show(total, "{:.1f}")
    each = [_med(runs, lambda o, i=i: o.cpu.consumers[i] if i < len(o.cpu.consumers)
                 else None) for i in range(n)]
    return f"{show(total, '{:.1f}')} ({' + '.join(show(e, '{:.1f}') for e in each)})"


def cpu_table(runs: Runs, specs: list[Spec]) -> list[str]:
    """Markdown lines: one row per spec and mode, where the CPU went over the run (from
    the first start, or the start of the produce, to the last file in Girder)."""
    headers = ["system, run", "span s", "files/s", "CPU-s: processes under test (each)",
               "Girder", "database", "Kafka", "producer", "benchmark process (proxy)",
               "not measured: others' processes / kernel threads / interrupts / steal",
               "machine busy", "Girder + database CPU-s/file",
               "all but the processes under test, CPU-s/file",
               "ceiling files/s (cores ÷ that)", "ceiling with the cores others left",
               "Girder's ceiling files/s (1 core ÷ its CPU-s/file)"]
    rows = []
    for spec in specs:
        for mode, name in MODES.items():
            got = runs.get((mode, spec))
            if not got:
                continue
            cpu = [o.cpu for o in got]
            rows.append([
                f"{spec.label}, {name}", show(_med(got, lambda o: o.cpu.span_s), "{:.1f}"),
                show(rate_of(runs, mode, spec)), _consumers(got)]
                + [show(median_or_none(c.services.get(s) for c in cpu), "{:.1f}")
                   for s in ("girder", "mongo", "kafka")]
                + [show(median_or_none(getattr(c, a) for c in cpu), "{:.1f}")
                   for a in ("producer", "harness")]
                + [" / ".join(show(median_or_none(c.outside.get(k) for c in cpu), "{:.1f}")
                              for k in ("others", "kernel threads", "interrupts", "steal"))]
                + [f"{Stat.of(c.busy for c in cpu).median:.0%}",
                   show(median_or_none(c.per_file(c.girder_db) for c in cpu), "{:.3f}"),
                   show(median_or_none(c.per_file(c.not_consumers) for c in cpu), "{:.3f}"),
                   show(median_or_none(c.ceiling for c in cpu), "{:.1f}"),
                   show(median_or_none(c.ceiling_left for c in cpu), "{:.1f}"),
                   show(median_or_none(c.girder_ceiling for c in cpu), "{:.1f}")])
    return ["Where the CPU went in each run (medians), from the first process's start "
            "(started together) or the start of the produce (joined) to the last file in "
            "Girder:", "", md_table(headers, rows), ""]


def routes_per_file(runs: Runs, specs: list[Spec], mode: str = "joined",
                    top: int = 8) -> list[str]:
    """A note per spec of ours: Girder requests per file by route (first run of
    ``mode``), the commonest first, so a route that grows with the processes shows."""
    notes = []
    for spec in specs:
        got = runs.get((mode, spec))
        if spec.system != "ours" or not got or not got[0].result.n_files:
            continue
        seen = got[0]
        ranked = sorted(seen.routes.items(), key=lambda kv: -kv[1])[:top]
        notes.append(f"Girder requests per file, {spec.label}, {MODES[mode]}: " + ", ".join(
            f"`{route}` {n / seen.result.n_files:.2f}" for route, n in ranked) + ".")
    return notes
