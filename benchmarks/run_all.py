"""``make bench``: run the scenarios of issue 6 against the local stack and write
``docs/benchmarks.md``.

    python -m benchmarks.run_all                  # everything, full sizes (about 2-2.5 hours)
    python -m benchmarks.run_all --quick          # smoke-test sizes, 1 repetition (minutes)
    python -m benchmarks.run_all --only 1,4 --reps 5 --soak-minutes 10
    python -m benchmarks.run_all --only 4 --merge  # re-run one, keep the others

Needs the stack (Kafka, Girder, the Prefect server) running, ``.venv`` and
``.venv-openmsistream``; ``make bench`` sees to all three. The stack's addresses come
from the environment or from ``python3 -m stack.stackctl env``. Scratch data lives in
a temporary folder (``--work-dir`` to choose where), deleted at the end, as are the
benchmark's topics and Girder collections (``--keep`` keeps them). The report is
rewritten after every scenario, so an interrupted run keeps what it measured. The
exit status is 1 if any scenario failed (its error is in the report).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_common import OMSI_PROCESSOR, OUR_CLI, REPO_ROOT, load_stack
from benchmarks.bench_config import FULL, QUICK, Context
from benchmarks.bench_girder import GirderView, delete_topics, girder_client
from benchmarks.bench_report import (
    Section, git_state, machine_facts, merged_sections, write_report,
)
from benchmarks.scenario_bigoverlap import scenario_big_overlap
from benchmarks.scenario_remote import scenario_remote
from benchmarks.scenario_restart import scenario_restart
from benchmarks.scenario_scaleout import scenario_scaleout
from benchmarks.scenario_scaleout_files import scenario_scaleout_files, scenario_scaleout_latency
from benchmarks.scenario_soak import scenario_soak
from benchmarks.scenario_startup import scenario_startup
from benchmarks.scenario_throughput import (
    scenario_big_files, scenario_huge_file, scenario_small_files,
)

__all__ = ["SCENARIOS", "parse_args", "main"]

SCENARIOS = {
    1: ("small files", scenario_small_files),
    2: ("big files, memory and disk", scenario_big_files),
    3: ("one huge file, disk", scenario_huge_file),
    4: ("restart cost", scenario_restart),
    5: ("scale-out", scenario_scaleout),
    6: ("soak", scenario_soak),
    7: ("remote Girder", scenario_remote),
    8: ("start-up", scenario_startup),
    9: ("big files overlapped", scenario_big_overlap),
    10: ("scale-out, files of several chunks", scenario_scaleout_files),
    11: ("scale-out, files of several small chunks, latency-bound", scenario_scaleout_latency),
}


def _only(text: str) -> list[int]:
    try:
        chosen = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of scenario numbers: {text!r}") from None
    bad = [n for n in chosen if n not in SCENARIOS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(map(str, SCENARIOS))}, "
                                         f"got {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all",
        description="Benchmarks of issue 6, side by side with OpenMSIStream 1.8.8 and the "
                    "girder-client limit; writes docs/benchmarks.md.",
        epilog="Scenarios: " + "; ".join(f"{n} {name}" for n, (name, _) in SCENARIOS.items()))
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes and 1 repetition (a few minutes)")
    parser.add_argument("--only", type=_only, default=list(SCENARIOS),
                        help="comma-separated scenario numbers, e.g. 1,2 (default: all)")
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default: 3; quick: 1)")
    parser.add_argument("--n-threads", type=int, help="--n_threads of every consumer (default: 2)")
    parser.add_argument("--soak-minutes", type=float, help="soak duration (default: 30; quick: 1)")
    parser.add_argument("--remote-delay-ms", type=float,
                        help="scenario 7: delay added to every Girder request (default: 20)")
    parser.add_argument("--remote-files", type=int,
                        help="scenario 7: number of 64 KiB files (default: 200; quick: 40)")
    parser.add_argument("--remote-slow-delay-ms", type=float,
                        help="scenario 7: delay of the slow Girder's pass (default: 200)")
    parser.add_argument("--files-scale-delay-ms", type=float,
                        help="scenario 10: delay added to every Girder request (default: 20)")
    parser.add_argument("--files-scale-files", type=int,
                        help="scenario 10: number of files (default: 120; quick: 24)")
    parser.add_argument("--files-scale-chunk-kib", type=int,
                        help="scenario 10: chunk size in KiB; files have 2 to 4 chunks "
                             "(default: 512)")
    parser.add_argument("--latency-scale-files", type=int,
                        help="scenario 11: number of files (default: 480; quick: 40)")
    parser.add_argument("--latency-scale-chunk-kib", type=int,
                        help="scenario 11: chunk size in KiB (default: 16)")
    parser.add_argument("--latency-scale-delay-ms", type=float,
                        help="scenario 11: delay added to every Girder request (default: 200)")
    parser.add_argument("--no-soak-baseline", action="store_true",
                        help="run only our consumer in the soak")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--work-dir", type=Path, help="where the scratch folder is made")
    parser.add_argument("--merge", action="store_true",
                        help="keep the earlier report's sections of the scenarios not run "
                             "now (from its .json sidecar)")
    parser.add_argument("--keep", action="store_true",
                        help="keep scratch data, topics and Girder collections")
    return parser.parse_args(argv)


def _preflight() -> None:
    for program, hint in ((OUR_CLI, "make install"), (OMSI_PROCESSOR, "make install")):
        if not program.exists():
            sys.exit(f"error: {program} is missing (run `{hint}`)")


def _save_logs(work: Path, number: int) -> Path:
    """Copy the scratch folder's logs out of it (it is deleted at the end)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = Path(tempfile.gettempdir()) / f"gus-bench-logs-{stamp}-{number}"
    target.mkdir(parents=True, exist_ok=True)
    for log in list(work.glob("log-*.txt")) + list(work.glob("*produce.log")):
        shutil.copy2(log, target / log.name)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _preflight()
    sizes = QUICK if args.quick else FULL
    changes = {k: v for k, v in {"reps": args.reps, "n_threads": args.n_threads,
                                 "soak_minutes": args.soak_minutes,
                                 "remote_delay_ms": args.remote_delay_ms,
                                 "remote_files": args.remote_files,
                                 "remote_slow_delay_ms": args.remote_slow_delay_ms,
                                 "files_scale_delay_ms": args.files_scale_delay_ms,
                                 "files_scale_files": args.files_scale_files,
                                 "files_scale_chunk_kib": args.files_scale_chunk_kib,
                                 "latency_scale_files": args.latency_scale_files,
                                 "latency_scale_chunk_kib": args.latency_scale_chunk_kib,
                                 "latency_scale_delay_ms": args.latency_scale_delay_ms,
                                 }.items() if v is not None}
    if args.no_soak_baseline:
        changes["soak_baseline"] = False
    sizes = replace(sizes, **changes)
    stack = load_stack()
    os.environ.update(stack.env())  # girder-client and confluent-kafka in this process too
    gc = girder_client(stack)
    command = "python -m benchmarks.run_all" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    work = Path(tempfile.mkdtemp(prefix="gus-bench-", dir=args.work_dir))
    ctx = Context(stack, gc, work, sizes, [command], keep=args.keep)
    started = time.time()
    facts = machine_facts(stack, gc)
    ctx.log(f"scratch folder {work}; scenarios {args.only}; {sizes.reps} repetition(s); "
            f"n_threads {sizes.n_threads}{'; QUICK sizes' if args.quick else ''}")
    provenance = (f"`{command}` at {git_state()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}")
    sections: list[Section] = []
    failed = []
    try:
        for number in args.only:
            name, scenario = SCENARIOS[number]
            ctx.log(f"scenario {number}: {name}")
            t0 = time.monotonic()
            try:
                section = scenario(ctx)
            except Exception:  # noqa: BLE001 - reported, then the next scenario runs
                text = traceback.format_exc()
                print(text, file=sys.stderr, flush=True)
                saved = _save_logs(work, number)
                section = Section(f"{number}. {name}", f"The processes' logs were saved in "
                                  f"`{saved}`.", error=text)
                failed.append(number)
            section.seconds = time.monotonic() - t0
            section.number = number
            section.provenance = provenance
            sections.append(section)
            shown = merged_sections(args.output, sections) if args.merge else sections
            write_report(args.output, shown, facts, command, args.quick, started)
            ctx.log(f"scenario {number} done in {section.seconds / 60:.1f} min; "
                    f"wrote {args.output}")
    finally:
        if not args.keep:
            GirderView.delete_all()  # collections of runs that failed half-way
            delete_topics(stack, list(ctx.topics))
            shutil.rmtree(work, ignore_errors=True)
    ctx.log(f"all done in {(time.time() - started) / 60:.1f} min"
            + (f"; FAILED: scenarios {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
