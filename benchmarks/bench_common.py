"""Plumbing shared by every benchmark: the stack's addresses, the programs' paths,
background processes with RSS sampling, and the statistics the tables print.

Why a process wrapper of our own: every consumer under test runs as a subprocess (so
that its RSS is its own, a SIGKILL is a real crash and start-up costs count), is
stopped by its PID only (``q`` on stdin, then SIGTERM, then SIGKILL) and has its
output kept in a log file for the report when something goes wrong.
"""

from __future__ import annotations

import atexit
import os
import signal
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO_ROOT", "OUR_CLI", "OUR_PROCESSOR", "OUR_PYTHON", "OMSI_BIN", "OMSI_PROCESSOR", "PREFECT_DB",
    "MIB", "KIB", "Stack", "load_stack", "new_name", "BenchError", "Proc", "tree_rss_bytes",
    "tree_pids", "cpu_seconds", "CpuTrace", "Stat", "fmt_mib", "fmt_s", "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_BIN = REPO_ROOT / ".venv" / "bin"
OUR_CLI = OUR_BIN / "girder-upload-stream"
OUR_PROCESSOR = OUR_BIN / "GirderUploadStreamProcessor"
OUR_PYTHON = OUR_BIN / "python"
OMSI_BIN = Path(os.environ.get("GUS_OPENMSISTREAM_VENV", REPO_ROOT / ".venv-openmsistream")) / "bin"
OMSI_PROCESSOR = OMSI_BIN / "GirderUploadStreamProcessor"
PREFECT_DB = Path(os.environ.get("GUS_STACK_DIR", REPO_ROOT / ".stack")) / "prefect" / "prefect.db"
KIB = 1 << 10
MIB = 1 << 20
RSS_INTERVAL = 0.2


class BenchError(RuntimeError):
    """A benchmark run could not be measured (a consumer died, a timeout, lost files)."""


# --------------------------------------------------------------------------- the stack

@dataclass(frozen=True)
class Stack:
    """Where the local stack listens; read from the environment or ``stackctl env``."""

    bootstrap: str
    girder_url: str
    girder_key: str
    prefect_url: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a consumer or producer process pointed at the stack."""
        return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "GIRDER_API_URL": self.girder_url, "GIRDER_API_KEY": self.girder_key,
                "PREFECT_API_URL": self.prefect_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", **extra}


def load_stack() -> Stack:
    """The stack's addresses: ``$KAFKA_BOOTSTRAP_SERVERS`` etc. when set (as in
    ``make bench``), otherwise what ``python3 -m stack.stackctl env`` prints."""
    names = ("KAFKA_BOOTSTRAP_SERVERS", "GIRDER_API_URL", "GIRDER_API_KEY", "PREFECT_API_URL")
    values = {n: os.environ.get(n, "") for n in names}
    if not all(values.values()):
        out = subprocess.run(["python3", "-m", "stack.stackctl", "env", "kafka", "girder",
                              "prefect"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            if name in values and not values[name]:
                values[name] = value.strip().strip("'\"")
    missing = [n for n, v in values.items() if not v]
    if missing:
        raise BenchError(f"stack not running or not configured: {', '.join(missing)} unknown "
                         "(run `make stack-up prefect-up` or `make bench`)")
    return Stack(values["KAFKA_BOOTSTRAP_SERVERS"], values["GIRDER_API_URL"],
                 values["GIRDER_API_KEY"], values["PREFECT_API_URL"])


def new_name(prefix: str) -> str:
    """A fresh topic / collection / group name (``bench-<prefix>-<8 hex>``)."""
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- processes

def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids += [int(c) for c in text.split()]
    except OSError:
        pass
    return kids


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (0 once gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * KIB
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    out, todo, seen = [], [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if Path(f"/proc/{p}").exists():
            out.append(p)
            todo += _children(p)
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU-seconds spent so far by ``pids`` (and their reaped children)."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


class CpuTrace:
    """CPU-seconds of a set of processes sampled over time, to read the CPU spent
    between two wall-clock moments (e.g. start -> last byte in Girder)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    def add(self, cpu: float, wall: float | None = None) -> None:
        self.samples.append((time.time() if wall is None else wall, cpu))

    def at(self, wall: float) -> float:
        """CPU-seconds at ``wall``: the last sample taken at or before it (0 if none)."""
        before = [cpu for t, cpu in self.samples if t <= wall]
        return before[-1] if before else 0.0

    def between(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)


_LIVE: set[Proc] = set()


class Proc:
    """A program under test, started now in its own session, its output in ``log``.

    ``started_wall`` (``time.time()`` just before the start) is what Girder timestamps
    are compared with. A thread samples the RSS of the process tree every 0.2 s;
    ``peak_rss`` is the largest sum seen and ``rss_now()`` the current one; ``cpu`` is
    the tree's CPU-seconds, sampled with it (a :class:`CpuTrace`).
    """

    def __init__(self, name: str, argv: list[str | Path], log: Path, env: dict[str, str],
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in _finish()
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO_ROOT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.peak_rss = 0
        self.cpu = CpuTrace()
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, name=f"rss-{name}", daemon=True)
        self._sampler.start()
        _LIVE.add(self)

    def _sample(self) -> None:
        while self._sampling and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.pid))
            self.cpu.add(cpu_seconds(tree_pids(self.pid)))
            time.sleep(RSS_INTERVAL)

    def rss_now(self) -> int:
        return tree_rss_bytes(self.pid) if self.alive() else 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited early (code {self.proc.returncode}); "
                             f"last output:\n{self.output()[-3000:]}")

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def stop(self, timeout: float = 60.0) -> int:
        """``q`` on stdin, then SIGTERM, then SIGKILL, all to this PID; the exit code."""
        if self.alive():
            self.send("q")
            for sig, wait in ((None, timeout), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                if sig is not None:
                    self._signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        return self._finish()

    def kill(self) -> int:
        """SIGKILL the program (its own process group, which holds only what it started)."""
        self._signal(signal.SIGKILL)
        self.proc.wait(30)
        return self._finish()

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(10)
            raise BenchError(f"{self.name} did not finish within {timeout:.0f}s; last "
                             f"output:\n{self.output()[-3000:]}") from None
        return self._finish()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # the group id is our child's PID (own session)
        except ProcessLookupError:
            pass

    def _finish(self) -> int:
        self._sampling = False
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._out.close()
        _LIVE.discard(self)
        return self.proc.returncode


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop(timeout=5)


def wait_until(condition, timeout: float, what: str, procs: list[Proc] = (),
               interval: float = 0.2):
    """Call ``condition()`` until it returns a true value (returned); fail on timeout or
    when one of ``procs`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            proc.check_alive()
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name} ({p.log}) ---\n{p.output()[-2000:]}" for p in procs)
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(interval)


# --------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class Stat:
    """Median, minimum and maximum of the repetitions of one measurement."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> Stat:
        return cls(tuple(float(v) for v in values if v is not None))

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def show(self, fmt: str = "{:.1f}") -> str:
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"


def fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.0f} MiB"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s"
