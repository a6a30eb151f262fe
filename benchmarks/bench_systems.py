"""The three systems under test and one timed run of any of them.

* ``ours``: ``girder-upload-stream run GIRDER_API_URL --config local ...`` with the API
  key in ``$GIRDER_API_KEY`` and ``PREFECT_API_URL`` set to the stack's server;
* ``omsi``: OpenMSIStream 1.8.8's ``GirderUploadStreamProcessor GIRDER_API_URL KEY
  --config FILE ...`` (a black box), its config file the same consumer settings as our
  bundled ``local`` config;
* ``limit``: ``python -m benchmarks.girder_limit`` on the local copy of the files.

A timed run starts the process(es) with a fresh Girder collection, waits until all
the expected bytes are in it, checks every file is there once with its size, and
stops the process(es) by PID (``q``, then SIGTERM). Time runs from the (first)
process's start to the moment the last file landed in Girder, by Girder's clock.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_common import (
    OMSI_PROCESSOR, OUR_CLI, OUR_PROCESSOR, OUR_PYTHON, REPO_ROOT, BenchError, Proc, Stack, new_name,
)
from benchmarks.bench_data import Dataset
from benchmarks.bench_girder import GirderView, match_items
from benchmarks.bench_prefect import db_logical_bytes, flow_run_ids, task_runs

__all__ = ["LABELS", "Spec", "RunResult", "omsi_config", "start_system", "display_argv",
           "timed_run", "run_result", "stall_for", "failure_hint", "parse_messages_read",
           "parse_bytes_read"]

LABELS = {"ours": "girder-upload-stream", "omsi": "OpenMSIStream 1.8.8",
          "limit": "girder-client limit",
          "ours_dropin": "girder-upload-stream's GirderUploadStreamProcessor"}


@dataclass(frozen=True)
class Spec:
    """What to run: a system, its ``--n_threads`` and ``--mode``, how many processes
    (sharing one consumer group when more than one), and a fixed group id if any."""

    system: str
    n_threads: int = 2
    mode: str = "memory"
    processes: int = 1
    group: str | None = None
    #: ours only: PREFECT_API_URL set to the stack's server (False: a CLI user's
    #: default, no Prefect API configured, in a scratch PREFECT_HOME)
    prefect_server: bool = True
    budget_mb: int | None = None  # ours: --memory_budget_mb (None: its default)
    rekey: bool = False  # ours: --rekey_by_file (issue 23)

    @property
    def label(self) -> str:
        text = LABELS[self.system]
        if self.system.startswith("ours") and not self.prefect_server:
            text += ", no Prefect server"
        if self.system != "limit" and self.mode != "memory":
            text += f", {self.mode} mode"
        if self.budget_mb is not None:
            text += f", budget {self.budget_mb} MiB"
        if self.rekey:
            text += ", --rekey_by_file"
        if self.processes > 1:
            text += f", {self.processes} processes"
        return text


@dataclass
class RunResult:
    """One timed run. Times are seconds from the (first) process's start; ``n_files``
    and ``total_bytes`` count the files that reached Girder."""

    spec: Spec
    seconds: float
    first_s: float
    n_files: int
    total_bytes: int
    peak_rss: int
    argv: list[str]
    requests: int | None = None
    task_runs: int | None = None
    db_growth: int | None = None
    duplicates: int = 0
    missing: int = 0  # files that never reached Girder (the run gave up on them)
    missing_detail: list[str] = field(default_factory=list)
    failure: str | None = None  # the consumer's first error line when files are missing
    messages_read: int | None = None
    outputs: list[str] = field(default_factory=list)
    #: ours: seconds from the start to the first message read (the start-up), from its
    #: last log lines; None for the others (the limit reads files from the start).
    startup_s: float | None = None
    uploads_in_flight: int | None = None  # ours: the most upload units at once
    started_wall: float = 0.0  # epoch s of the (first) process's start
    #: CPU-seconds (user + system) of the process tree(s) from the start to the last
    #: file in Girder, sampled every 0.2 s
    cpu_s: float | None = None
    cpu_startup_s: float | None = None  # ours: of that, spent before the first message

    @property
    def active_mb_s(self) -> float | None:
        """MB/s from the first message read to the last file in Girder."""
        if self.startup_s is None or self.seconds <= self.startup_s:
            return None
        return self.total_bytes / 1e6 / (self.seconds - self.startup_s)

    @property
    def files_s(self) -> float:
        return self.n_files / self.seconds

    @property
    def mb_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds

    @property
    def steady_files_s(self) -> float | None:
        """Files/s from the first file to the last (start-up left out)."""
        span = self.seconds - self.first_s
        return (self.n_files - 1) / span if self.n_files > 1 and span > 0 else None

    @property
    def steady_mb_s(self) -> float | None:
        """MB/s from the first file to the last, counting the files after the first."""
        span = self.seconds - self.first_s
        if self.n_files < 2 or span <= 0:
            return None
        return self.total_bytes * (self.n_files - 1) / self.n_files / 1e6 / span


def omsi_config(work: Path, stack: Stack) -> Path:
    """An INI config for OpenMSIStream's programs with our ``local`` consumer settings."""
    path = work / "omsi.config"
    if not path.exists():
        path.write_text(
            "[broker]\n"
            f"bootstrap.servers = {stack.bootstrap}\n\n"
            "[producer]\n"
            "key.serializer   = StringSerializer\n"
            "value.serializer = DataFileChunkSerializer\n\n"
            "[consumer]\n"
            "group.id           = create_new\n"
            "auto.offset.reset  = earliest\n"
            "enable.auto.commit = False\n"
            "fetch.min.bytes    = 100000\n"
            "key.deserializer   = StringDeserializer\n"
            "value.deserializer = DataFileChunkDeserializer\n")
    return path


def start_system(stack: Stack, spec: Spec, work: Path, topic: str, collection: str,
                 data: Dataset, api_url: str | None = None, index: int = 0,
                 group: str | None = None, out_index: int | None = None) -> Proc:
    """Start process number ``index`` of ``spec`` consuming ``topic`` into ``collection``;
    its ``--output_dir`` (registries) is that of process ``out_index`` (default: its own),
    so that a restart finds the registries of the run it replaces."""
    api = api_url or stack.girder_url
    out = work / f"out-{collection}-{index if out_index is None else out_index}"
    group = group or spec.group or "create_new"
    common = ["--topic_name", topic, "--collection_name", collection,
              "--n_threads", str(spec.n_threads), "--mode", spec.mode, "--output_dir", out,
              "--consumer_group_id", group, "--update_seconds", "3600"]
    if spec.system == "ours":
        argv = [OUR_CLI, "run", api, "--config", "local", *common]
        if spec.budget_mb is not None:
            argv += ["--memory_budget_mb", str(spec.budget_mb)]
        if spec.rekey:
            argv.append("--rekey_by_file")
    elif spec.system == "omsi":
        argv = [OMSI_PROCESSOR, api, stack.girder_key, "--config", omsi_config(work, stack),
                *common]
    elif spec.system == "ours_dropin":
        argv = [OUR_PROCESSOR, api, stack.girder_key, "--config", omsi_config(work, stack),
                *common]
    elif spec.system == "limit":
        argv = [OUR_PYTHON, "-m", "benchmarks.girder_limit", data.root, "--collection",
                collection, "--root_folder", topic, "--n_threads", str(spec.n_threads),
                "--api_url", api]
    else:
        raise ValueError(spec.system)
    log = work / f"log-{collection}-{index}.txt"
    env = stack.env()
    if not spec.prefect_server:
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_HOME"] = str(work / "prefect-home")  # not the user's ~/.prefect
    return Proc(f"{spec.label} #{index}", argv, log, env, cwd=REPO_ROOT)


def display_argv(proc: Proc, stack: Stack, work: Path) -> str:
    """The command line as it ran, with the key and the scratch folder replaced."""
    words = []
    for word in proc.argv:
        word = word.replace(stack.girder_key, "$GIRDER_API_KEY").replace(str(work), "$WORK")
        word = word.replace(str(REPO_ROOT) + "/", "")
        words.append(word)
    return " ".join(words)


_OURS_READ = re.compile(r"(\d[\d,]*) messages read")
_OMSI_READ = re.compile(r"(\d[\d,]*) total messages were consumed")


def parse_messages_read(output: str) -> int | None:
    """Messages read, from the summary line each consumer prints when it stops."""
    found = _OURS_READ.findall(output) or _OMSI_READ.findall(output)
    return int(found[-1].replace(",", "")) if found else None


_FAILURE = re.compile(r"^.*(ERROR|WARNING|Traceback|failed).*$", re.MULTILINE)


def failure_hint(output: str) -> str | None:
    """The first error or warning line of a consumer's output, to say why files are
    missing (e.g. OpenMSIStream's "failed to create the 'x' folder")."""
    for match in _FAILURE.finditer(output):
        line = match.group(0).strip()
        if " 0 failed" not in line and "files_failed" not in line:
            return line[:300]
    return None


_OURS_FIRST = re.compile(r"first message read at ([\d.]+) \(epoch s\); at most (\d+) upload"
                         r".*?at most (\d+) open at once")


def parse_first_message(output: str) -> tuple[float | None, int | None]:
    """(epoch of the first message read, most Girder uploads open at once: upload units
    or streamed uploads, whichever is more), from our flow's last log lines."""
    found = _OURS_FIRST.findall(output)
    if not found:
        return None, None
    first, units, streams = found[-1]
    return float(first), max(int(units), int(streams))


_OURS_BYTES = re.compile(r"'bytes_read': (\d+)")


def parse_bytes_read(output: str) -> int | None:
    """Bytes of the messages read, from our flow's last log line (OpenMSIStream does
    not report it)."""
    found = _OURS_BYTES.findall(output)
    return int(found[-1]) if found else None


def timed_run(stack: Stack, gc, spec: Spec, work: Path, topic: str, data: Dataset,
              timeout: float, api_url: str | None = None, keep: bool = False,
              group: str | None = None) -> RunResult:
    """Run ``spec`` on ``topic`` (already produced) into a fresh collection and time it;
    ``group``: the consumer group id of its process(es) (default: a fresh one when
    several, ``create_new`` for one)."""
    collection = new_name(spec.system)
    view = GirderView(gc, collection)
    group = group or (new_name("group") if spec.processes > 1 and not spec.group else None)
    db_before = db_logical_bytes() if spec.system == "ours" and spec.prefect_server else None
    if spec.system == "omsi" and spec.processes > 1:
        # OpenMSIStream's processes each create the collection at start; the one that
        # loses the race exits (HTTP 400). Made beforehand, both find it.
        gc.createCollection(collection, public=True)
    procs = [start_system(stack, spec, work, topic, collection, data, api_url, i, group)
             for i in range(spec.processes)]
    try:
        final = view.wait_progress(data.total_bytes, stall_for(data), timeout, procs)
        detected = time.time()
        check = _settled_check(view, data, 10.0 if final >= data.total_bytes else 0.0)
    finally:
        outputs = []
        for proc in procs:
            proc.stop()
            outputs.append(proc.output())
    started = min(p.started_wall for p in procs)
    landed = [it.landed or detected for it in check["complete"].values()]
    result = run_result(spec, data, check, procs, outputs, landed, started,
                        [display_argv(p, stack, work) for p in procs])
    result.cpu_s = sum(p.cpu.at(max(landed)) for p in procs)
    if result.missing:
        result.failure = next((h for h in map(failure_hint, outputs) if h), None)
        result.missing_detail = (check["missing"] + check["wrong_detail"])[:3]
    reads = [parse_messages_read(o) for o in outputs]
    result.messages_read = sum(r for r in reads if r is not None) if any(
        r is not None for r in reads) else None
    if spec.system == "ours":
        firsts = [parse_first_message(o) for o in outputs]
        epochs = [f for f, _ in firsts if f is not None]
        if epochs:
            result.startup_s = min(epochs) - started
            result.cpu_startup_s = sum(p.cpu.at(min(epochs)) for p in procs)
            result.uploads_in_flight = max(n for _, n in firsts if n is not None)
    if spec.system == "ours" and spec.prefect_server:
        time.sleep(3)  # let the server record the last task runs and logs
        ids = [i for o in outputs for i in flow_run_ids(o)]
        result.task_runs = task_runs(stack, ids)
        after = db_logical_bytes()
        result.db_growth = (after - db_before if after is not None and db_before is not None
                            else None)
    if not keep:
        view.delete()
        for i in range(spec.processes):
            shutil.rmtree(work / f"out-{collection}-{i}", ignore_errors=True)
    return result


def stall_for(data: Dataset) -> float:
    """How long a run may go without a new file in Girder before the harness decides
    the rest will never come: 2 minutes, plus the largest file at 5 MB/s."""
    return 120.0 + max(data.files.values(), default=0) / 5e6


def run_result(spec: Spec, data: Dataset, check: dict, procs: list, outputs: list[str],
               landed: list[float], started: float, argv: list) -> RunResult:
    """One run's result from what Girder holds (``check``: :func:`match_items`) and when
    each file landed (epoch seconds); raises when no file reached Girder."""
    if not landed:
        raise BenchError(f"{spec.label}: no file reached Girder; output:\n{outputs[0][-3000:]}")
    return RunResult(spec, seconds=max(landed) - started, first_s=min(landed) - started,
                     n_files=len(check["complete"]),
                     total_bytes=sum(data.files[rel] for rel in check["complete"]),
                     peak_rss=max(p.peak_rss for p in procs), argv=argv,
                     duplicates=len(check["duplicates"]), outputs=outputs,
                     missing=len(check["missing"]) + len(check["wrong_size"]),
                     started_wall=started)


def _settled_check(view: GirderView, data: Dataset, settle: float = 10.0) -> dict:
    """Check names, sizes and duplicates; a file counted in the collection's size may
    still be finishing its metadata, so a short mismatch is re-checked for ``settle`` s."""
    deadline = time.monotonic() + settle
    while True:
        check = match_items(view.items(), data.files)
        if (not check["missing"] and not check["wrong_size"]) or time.monotonic() > deadline:
            if check["missing"] or check["wrong_size"]:
                print(f"[bench] collection {view.name}: {len(check['missing'])} file(s) "
                      f"missing {check['missing'][:3]}, {len(check['wrong_size'])} of the "
                      f"wrong size {check['wrong_detail'][:3]}", flush=True)
            return check
        time.sleep(1)
