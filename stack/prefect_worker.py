"""A Prefect worker of the process work pool ``girder-upload-stream``, for the local
Prefect server (``prefect_server.py``): what runs the deployments of
``deployments/prefect.yaml`` when someone presses *Run* in the UI.

Not part of the default stack. ``make demo`` starts it, ``make prefect-down`` stops
it (``python3 -m stack.stackctl up worker`` / ``down worker`` by hand). It runs
``prefect worker start --pool girder-upload-stream --type process`` from the
repository root, creating the pool if it is missing, with ``PREFECT_API_URL`` set to
the local server and ``GIRDER_API_KEY`` emptied: the runs it starts take the key from
the Secret block their deployment names, never from the worker's environment.

Each flow run is a child process in a session of its own (Prefect isolates it), so a
signal to the worker's process group does not reach it. ``stop`` therefore signals the
worker's descendants as well: a running ``stream`` run gets SIGTERM and stops
gracefully, as it does on cancellation.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from stack import common, prefect_server
from stack.common import HOST, REPO_ROOT, ComponentError

__all__ = ["NAME", "POOL", "install", "start", "stop", "status", "env", "worker_name"]

NAME = "worker"
POOL = "girder-upload-stream"
START_TIMEOUT = 90.0
#: How often the worker asks the server for runs to start (Prefect's default is 10 s);
#: a shorter wait between pressing Run and the run starting.
QUERY_SECONDS = "5"
_PREFECT = REPO_ROOT / ".venv" / "bin" / "prefect"


def worker_name() -> str:
    """The worker's name in the UI: one per stack (the Prefect port tells stacks apart)."""
    return f"gus-local-{prefect_server.PORT}"


def install() -> None:
    """The worker comes with the project's virtualenv, like the server."""
    prefect_server.install()


def _api(path: str, body: dict | None = None) -> object:
    url = f"http://{HOST}:{prefect_server.PORT}/api/{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _server_healthy() -> bool:
    try:
        return _api("health") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _online() -> bool:
    """Whether the server lists our worker in the pool, online."""
    try:
        workers = _api(f"work_pools/{POOL}/workers/filter", {"limit": 50})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(w.get("name") == worker_name() and w.get("status") == "ONLINE"
               for w in workers or [])


def start() -> None:
    """Start the worker (the server must be up) and wait until it shows as online."""
    if common.read_pid(NAME) is not None:
        return
    if not _server_healthy():
        raise ComponentError(f"{NAME}: the Prefect server is not running "
                             "(python3 -m stack.stackctl up prefect)")
    argv = [str(_PREFECT), "worker", "start", "--pool", POOL, "--type", "process",
            "--name", worker_name(), "--install-policy", "never"]
    pid = common.spawn(NAME, argv, cwd=REPO_ROOT, env={
        **prefect_server.env(), "GIRDER_API_KEY": "", "PREFECT_WORKER_QUERY_SECONDS": QUERY_SECONDS,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    deadline = time.monotonic() + START_TIMEOUT
    while not _online():
        if not common.pid_alive(pid) or time.monotonic() > deadline:
            stop()
            raise ComponentError(f"{NAME} did not come online in the pool {POOL!r}; "
                                 f"see its log: {common.log_path(NAME)}")
        time.sleep(0.5)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children...), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def stop(timeout: float = 30.0) -> None:
    """SIGTERM the worker's flow runs (their own sessions) and the worker, by PID."""
    pid = common.read_pid(NAME)
    runs = _descendants(pid) if pid is not None else []
    for child in runs:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(common.pid_alive(c) for c in runs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for child in runs:
        if common.pid_alive(child):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    common.stop_pid(NAME)


def status() -> str:
    pid = common.read_pid(NAME)
    if pid is None:
        return f"{NAME}: stopped"
    state = "running" if _online() else "running (not online in the pool yet)"
    return (f"{NAME}: {state} pid {pid}, pool {POOL!r} as {worker_name()}, "
            f"rss {common.rss_kib(pid) // 1024} MiB")


def env() -> dict[str, str]:
    return {}
