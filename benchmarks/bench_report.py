"""Writing ``docs/benchmarks.md``: the machine the numbers come from, one section per
scenario (a table, notes, the commands that produced it), and any failures.

Ratios are always "this row's median divided by the baseline's median" for the
column's metric, so > 1 is faster for a rate and bigger for a memory figure; each
table says which way is better.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.bench_common import OMSI_BIN, REPO_ROOT, Stack, Stat
from benchmarks.bench_prefect import server_version

__all__ = ["Section", "ratio", "md_table", "machine_facts", "git_state", "write_report",
           "merged_sections"]


@dataclass
class Section:
    """One scenario's part of the report."""

    title: str
    what: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)  # for the summary at the top
    error: str | None = None
    seconds: float = 0.0
    number: int = 0
    provenance: str = ""  # the invocation, commit and time that measured it


def merged_sections(path: Path, fresh: list[Section]) -> list[Section]:
    """``fresh`` plus the sections of an earlier report (its ``.json`` sidecar) for the
    scenarios not run now, in scenario order: ``--merge`` re-runs some scenarios without
    throwing away the others' numbers."""
    sidecar = path.with_suffix(".json")
    try:
        earlier = [Section(**doc) for doc in json.loads(sidecar.read_text("utf-8"))]
    except (OSError, ValueError, TypeError):
        earlier = []
    ran = {sec.number for sec in fresh}
    return sorted([sec for sec in earlier if sec.number not in ran] + fresh,
                  key=lambda sec: sec.number)


def ratio(value: Stat | float | None, base: Stat | float | None) -> str:
    """``value / base`` of the medians, as ``1.23×`` (``–`` when either is missing)."""
    v = value.median if isinstance(value, Stat) else value
    b = base.median if isinstance(base, Stat) else base
    if v is None or b is None or v != v or b != b or b == 0:
        return "–"
    return f"{v / b:.2f}×"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _meminfo_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version_in(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                              timeout=60).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _jar_version(folder: Path, prefix: str) -> str:
    for jar in sorted(folder.glob(f"{prefix}*.jar")) if folder.is_dir() else []:
        return jar.stem.removeprefix(prefix)
    return "unknown"


def git_state() -> str:
    """The commit benchmarked, and whether the core package had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "girder_upload_stream", "flows", "tasks")
    except (OSError, subprocess.SubprocessError):
        return "git state unknown"
    return f"git {commit}" + (", with uncommitted changes to the package" if dirty else "")


def machine_facts(stack: Stack, gc) -> list[tuple[str, str]]:
    """Cores, memory and the versions of everything involved."""
    stack_dir = Path(os.environ.get("GUS_STACK_DIR", REPO_ROOT / ".stack"))
    try:
        girder = gc.get("system/version")["release"]
    except Exception:  # noqa: BLE001 - informational only
        girder = "unknown"
    mongo = _jar_version(stack_dir / "mongo" / "build" / "libs", "mongo-java-server-core-")
    import confluent_kafka
    return [
        ("CPU", f"{os.cpu_count()} cores ({_cpu_model()})"),
        ("memory", _meminfo_total()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("Kafka broker", _jar_version(stack_dir / "kafka" / "libs", "kafka_2.13-")),
        ("Girder", f"{girder} on mongo-java-server {mongo} (H2)"),
        ("Prefect", f"{importlib.metadata.version('prefect')} (server {server_version(stack)}, "
                    "SQLite)"),
        ("girder-upload-stream", f"{importlib.metadata.version('girder-upload-stream')} "
                                 f"({git_state()})"),
        ("OpenMSIStream", _version_in(OMSI_BIN / "python", "openmsistream")),
        ("girder-client", f"{importlib.metadata.version('girder-client')} (ours), "
                          f"{_version_in(OMSI_BIN / 'python', 'girder-client')} (OpenMSIStream's)"),
        ("confluent-kafka / librdkafka",
         f"{importlib.metadata.version('confluent-kafka')} / {confluent_kafka.libversion()[0]}"
         " (ours), "
         f"{_version_in(OMSI_BIN / 'python', 'confluent-kafka')} (OpenMSIStream's)"),
    ]


def write_report(path: Path, sections: list[Section], facts: list[tuple[str, str]],
                 command: str, quick: bool, started: float) -> None:
    took = time.time() - started
    out = ["# Benchmarks", "",
           "<!-- Written by `make bench` (python -m benchmarks.run_all); do not edit by hand. -->",
           ""]
    if quick:
        out += ["> **Smoke-test sizes (`--quick`)**: one repetition of tiny data sets. These "
                "numbers only show that the harness works; they say little about "
                "performance. Run `make bench` for the real sizes.", ""]
    when = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started))
    runs = sorted({sec.provenance for sec in sections if sec.provenance})
    produced = (f"Produced by `{command}` on {when} in {took / 60:.1f} minutes."
                if len(runs) <= 1 else
                "Produced by several invocations (`--merge`); each section names its own. "
                f"The latest, `{command}`, ran on {when} in {took / 60:.1f} minutes.")
    out += [produced, "",
            "Every consumer runs as its own process against the local stack "
            "(see [stack.md](stack.md)): Kafka, Girder and the Prefect server on the same "
            "machine, so the consumers share its cores with them. Each repetition uses a "
            "fresh topic and a fresh Girder collection per system; the producer "
            "(`girder-upload-stream produce`) runs before and is not timed. Time runs from "
            "the consumer's start (process start, so imports and the group join count) to "
            "the moment the last file landed in Girder, read from Girder's own timestamps. "
            "Cells show the median of the repetitions with (min–max). Ratios divide medians.",
            "", "Baselines, run in the same invocation:", "",
            "* **OpenMSIStream 1.8.8** `GirderUploadStreamProcessor` from "
            "`.venv-openmsistream/` with the same `--n_threads` and `--mode`, and the same "
            "consumer settings as our `local` config;",
            "* **the girder-client limit** (`benchmarks/girder_limit.py`): the same files "
            "uploaded straight from local disk with girder-client, a thread pool of the same "
            "size, one client per thread, no Kafka: what any consumer could at best reach.",
            "", "How to run it: `make bench` (everything, full sizes), `make bench "
            "BENCH_ARGS=--quick` (smoke-test sizes), or e.g. `make bench BENCH_ARGS='--only "
            "1,4 --reps 5 --soak-minutes 10'`; `python -m benchmarks.run_all --help` lists "
            "the options. `make bench` starts the stack and the Prefect server if needed.", ""]
    summary = [f"* **{sec.title.split(':')[0]}**: {line}" for sec in sections
               for line in sec.headline]
    summary += [f"* **{sec.title}**: failed (see below)" for sec in sections if sec.error]
    if summary:
        out += ["## Summary", "", "Medians; ratios are girder-upload-stream ÷ the baseline.",
                ""] + summary + [""]
    out += ["## Machine", "", md_table(["", ""], [[k, v] for k, v in facts]), ""]
    for section in sections:
        out += [f"## {section.title}", "", section.what, ""]
        if section.error:
            out += ["**This scenario failed:**", "", "```", section.error.strip()[-4000:],
                    "```", ""]
        if section.rows:
            out += [md_table(section.headers, section.rows), ""]
        out += section.extra
        if section.notes:
            out += [f"* {note}" for note in section.notes] + [""]
        if section.provenance:
            out += [f"Measured by {section.provenance}.", ""]
        if section.commands:
            out += [f"Commands (scenario took {section.seconds / 60:.1f} min):", "", "```"]
            out += section.commands + ["```", ""]
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    if not quick:
        path.with_suffix(".json").write_text(
            json.dumps([asdict(sec) for sec in sections], indent=1) + "\n", encoding="utf-8")

