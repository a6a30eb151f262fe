"""Issue 22 §3: big files overlapped. Our consumer against the girder-client limit on
8 x 128 MiB files chunked over 8 partitions (so the files' chunks interleave), memory
mode with ``--memory_budget_mb 256``, and where the CPU goes.

    python -m benchmarks.scenario_bigoverlap [--reps 1] [--files 8] [--size-mib 128]

Needs the stack (Kafka, Mongo, Girder; a Prefect server only with ``--prefect``). For
every repetition: a fresh topic is produced (not timed), then our consumer and the
limit (``benchmarks/girder_limit.py``) each upload it into a fresh collection. Printed
per run: seconds from the process's start to the last byte in Girder (Girder's clock),
the same with the start-up (start -> first message read) taken off, the ratio to the
limit, the consumer tree's CPU-seconds (user + system, from /proc) per GiB, its peak
RSS, the CPU-seconds of Girder, Kafka and the database over the same span, and the
machine's busy fraction (from /proc/stat: other users of a shared machine count too).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_common import (
    MIB, PREFECT_DB, CpuTrace, Stat, cpu_seconds, load_stack, tree_pids,
)
from benchmarks.bench_config import FULL, Context
from benchmarks.bench_data import big_files
from benchmarks.bench_girder import girder_client
from benchmarks.bench_systems import RunResult, Spec, timed_run

__all__ = ["StackCpu", "main", "row_of"]

GIB = 1 << 30
SERVICES = ("girder", "kafka", "mongo", "prefect")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class StackCpu:
    """Samples the CPU-seconds of the stack's services (pid files below the stack
    folder) and of the whole machine every 0.2 s while a run goes on."""

    def __init__(self) -> None:
        pids_dir = PREFECT_DB.parent.parent / "pids"
        self.pids = {}
        for name in SERVICES:
            path = pids_dir / f"{name}.pid"
            if path.exists():
                self.pids[name] = int(path.read_text().split()[0])
        self.traces = {name: CpuTrace() for name in self.pids}
        self.busy, self.total = CpuTrace(), CpuTrace()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StackCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for name, pid in self.pids.items():
                self.traces[name].add(cpu_seconds(tree_pids(pid)), now)
            busy, total = _machine_busy()
            self.busy.add(busy, now)
            self.total.add(total, now)
            self._stop.wait(0.2)

    def spent(self, start: float, end: float) -> dict[str, float]:
        out = {name: t.between(start, end) for name, t in self.traces.items()}
        total = self.total.between(start, end)
        out["machine busy"] = self.busy.between(start, end) / total if total else float("nan")
        return out


def row_of(result: RunResult, spent: dict[str, float], limit_s: float | None) -> dict:
    """The figures of one run, by column name."""
    end = result.seconds
    active = end - result.startup_s if result.startup_s is not None else None
    gib = result.total_bytes / GIB
    row = {"s": end, "startup s": result.startup_s, "s w/o start-up": active,
           "first file s": result.first_s,
           "× limit": (limit_s / (active if active else end)) if limit_s else None,
           "CPU s": result.cpu_s, "CPU s/GiB": result.cpu_s / gib if result.cpu_s else None,
           "CPU s/GiB w/o start-up": (result.cpu_s - result.cpu_startup_s) / gib
           if result.cpu_s and result.cpu_startup_s is not None else None,
           "peak RSS MiB": result.peak_rss / MIB, "missing/dup": f"{result.missing}/"
           f"{result.duplicates}"}
    row.update({f"{k} CPU s" if k != "machine busy" else k: v for k, v in spent.items()})
    return row


def _show(rows: list[tuple[str, dict]]) -> str:
    keys = list(dict.fromkeys(k for _, r in rows for k in r))
    out = []
    for key in keys:
        cells = []
        for _, r in rows:
            v = r.get(key)
            cells.append("–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
        out.append(f"  {key:22s} " + "  ".join(f"{c:>10s}" for c in cells))
    return "\n".join([f"  {'':22s} " + "  ".join(f"{n:>10s}" for n, _ in rows)] + out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scenario_bigoverlap",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--prefect", action="store_true",
                        help="run our consumer with the stack's Prefect server")
    parser.add_argument("--no-limit", action="store_true", help="skip the limit's run")
    args = parser.parse_args(argv)
    stack = load_stack()
    work = Path(tempfile.mkdtemp(prefix="gus-bigoverlap-"))
    ctx = Context(stack, girder_client(stack), work, replace(FULL, reps=args.reps), sys.argv)
    ours = Spec("ours", args.n_threads, "memory", budget_mb=args.budget_mb,
                prefect_server=args.prefect)
    limit = Spec("limit", args.n_threads)
    summary: dict[str, list[dict]] = {"ours": [], "limit": []}
    try:
        data = big_files(work / "big", args.files, args.size_mib * MIB)
        for rep in ctx.repetitions():
            topic = ctx.topic_with("big", data, args.partitions)
            specs = [limit, ours] if not args.no_limit else [ours]
            runs: dict[str, tuple[RunResult, dict]] = {}
            for spec in specs if rep % 2 == 0 else specs[::-1]:
                with StackCpu() as cpu:
                    result = timed_run(stack, ctx.gc, spec, work, topic, data,
                                       ctx.timeout_for(data.total_bytes))
                spent = cpu.spent(result.started_wall, result.started_wall + result.seconds)
                runs[spec.system] = (result, spent)
                ctx.log(f"  {spec.label}: {result.seconds:.2f}s; {result.outputs[0][-300:]!r}"
                        if result.missing else f"  {spec.label}: {result.seconds:.2f}s")
            limit_s = runs["limit"][0].seconds if "limit" in runs else None
            rows = [(name, row_of(r, spent, limit_s if name == "ours" else None))
                    for name, (r, spent) in runs.items()]
            for name, row in rows:
                summary[name].append(row)
            print(_show(rows), flush=True)
            ctx.drop_topic(topic)
        if args.reps > 1:
            med = [(n, {k: Stat.of(r[k] for r in rs if isinstance(r.get(k), float)).median
                        for k in rs[0]}) for n, rs in summary.items() if rs]
            print("medians:\n" + _show(med), flush=True)
    finally:
        for topic in list(ctx.topics):
            ctx.drop_topic(topic)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
