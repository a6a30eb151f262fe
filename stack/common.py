"""Process plumbing shared by every stack component.

Only the standard library is used, so the stack can be driven by any Python 3.11
interpreter before the project's virtualenv exists. Every process binds to
127.0.0.1, writes its log and pid file under ``.stack/`` and is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "STACK_DIR",
    "HOST",
    "ComponentError",
    "component_dir",
    "log_path",
    "pid_path",
    "read_pid",
    "pid_alive",
    "spawn",
    "stop_pid",
    "wait_for_port",
    "port_open",
    "recorded_port",
    "record_port",
    "rss_kib",
    "java_executable",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_DIR = Path(os.environ.get("GUS_STACK_DIR", REPO_ROOT / ".stack"))
HOST = "127.0.0.1"


class ComponentError(RuntimeError):
    """A stack component failed to install, start or stop; the message names its log."""


def component_dir(name: str) -> Path:
    """Return (and create) the data folder of one component under ``.stack/``."""
    path = STACK_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_path(name: str) -> Path:
    return component_dir("logs") / f"{name}.log"


def pid_path(name: str) -> Path:
    return component_dir("pids") / f"{name}.pid"


def read_pid(name: str) -> int | None:
    """PID of a component we started, or None if no live process is recorded."""
    try:
        pid = int(pid_path(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def spawn(name: str, argv: list[str], *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> int:
    """Start ``argv`` detached in its own session, logging to ``.stack/logs/{name}.log``.

    The process gets its own session so that stopping it by PID (and its process
    group) never touches the caller, and it outlives the ``make`` that started it.
    """
    log = log_path(name)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
    pid_path(name).write_text(str(proc.pid))
    return proc.pid


def stop_pid(name: str, timeout: float = 20.0) -> bool:
    """Stop a component by its recorded PID: SIGTERM to its group, then SIGKILL.

    Returns True if a process was running.
    """
    pid = read_pid(name)
    pid_path(name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
    return True


def _port_file(name: str) -> Path:
    return component_dir("pids") / f"{name}.port"


def recorded_port(name: str, env_var: str, default: int) -> int:
    """The port a running component was started on, else the one it will use.

    The port is remembered at start (:func:`record_port`), so a changed ``env_var``
    cannot misdirect clients of a component that is already running.
    """
    if read_pid(name) is not None:
        try:
            return int(_port_file(name).read_text())
        except (FileNotFoundError, ValueError):
            pass
    return int(os.environ.get(env_var, default))


def record_port(name: str, port: int) -> None:
    """Remember the port a component is being started on (see :func:`recorded_port`)."""
    _port_file(name).write_text(str(port))


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(name: str, port: int, timeout: float, pid: int | None = None) -> None:
    """Wait until ``port`` accepts connections; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if pid is not None and not pid_alive(pid):
            raise ComponentError(
                f"{name} exited during start-up; see its log: {log_path(name)}")
        time.sleep(0.25)
    raise ComponentError(
        f"{name} did not listen on {HOST}:{port} within {timeout:.0f}s; see its log: {log_path(name)}")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children, in KiB (0 if unknown)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def java_executable() -> str:
    """The ``java`` of ``JAVA_HOME``, else the one on PATH (the Java components need 17+)."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise ComponentError("no `java` found (the stack's Java components need Java 17+): "
                             "install a JDK or set JAVA_HOME")
    return java
