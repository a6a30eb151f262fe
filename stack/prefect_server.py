"""A local ``prefect server start`` (SQLite) for the Prefect UI and deployments.

Not part of the default stack: without ``PREFECT_API_URL`` Prefect runs an
ephemeral API in-process, which is all the flow needs. Start this one to watch
runs in the UI or to serve deployments: ``make prefect-up``, then open
http://127.0.0.1:24200 and ``export PREFECT_API_URL=http://127.0.0.1:24200/api``.

Its database stays bounded (:data:`RETENTION`, Prefect's database vacuum service, see
docs/usage.md "Keeping the Prefect database small"): every 10 minutes the server deletes
the routine events of task runs and artifacts older than an hour, every other event
older than a day, and the flow runs (their task runs, logs and artifacts) that finished
more than a day ago. A run still going is never deleted.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from stack.common import (HOST, REPO_ROOT, ComponentError, component_dir, log_path, read_pid,
                          rss_kib, spawn, stop_pid, wait_for_port)

__all__ = ["NAME", "PORT", "RETENTION", "install", "start", "stop", "status", "env"]

NAME = "prefect"
PORT = int(os.environ.get("GUS_PREFECT_PORT", "24200"))
_PREFECT = REPO_ROOT / ".venv" / "bin" / "prefect"

#: Event types our runs write by the hundreds an hour (three per task run, one per
#: artifact publish): kept an hour. The task runs and artifacts stay in their own tables.
_ROUTINE_EVENTS = ("prefect.task-run.Pending", "prefect.task-run.Running",
                   "prefect.task-run.Completed", "prefect.artifact.created",
                   "prefect.artifact.updated", "prefect.artifact-collection.updated")
#: Prefect's database vacuum settings (names and formats of Prefect 3.9's
#: ``server.services.db_vacuum`` and ``server.events``).
RETENTION = {
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "600",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": "86400",  # finished flow runs
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P1D",  # every event (an ISO 8601 duration)
    "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": json.dumps(
        {**{event: 3600 for event in _ROUTINE_EVENTS}, "prefect.flow-run.heartbeat": 86400}),
}


def _server_env() -> dict[str, str]:
    home = component_dir("prefect")
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **RETENTION,
        "PREFECT_UI_API_URL": f"http://{HOST}:{PORT}/api",
        # The server must not talk to itself through a stale client setting.
        "PREFECT_API_URL": "",
    }


def install() -> None:
    """Prefect comes with the project's virtualenv (``make install``)."""
    if not _PREFECT.exists():
        raise ComponentError(f"{_PREFECT} is missing: run `make install` first")


def _healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{PORT}/api/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start() -> None:
    """Start the server and wait until its health endpoint answers."""
    if read_pid(NAME) and _healthy():
        return
    stop_pid(NAME)
    pid = spawn(NAME, [str(_PREFECT), "server", "start", "--host", HOST, "--port", str(PORT)],
                env=_server_env())
    try:
        wait_for_port(NAME, PORT, timeout=90, pid=pid)
        deadline = time.monotonic() + 60
        while not _healthy():
            if time.monotonic() > deadline:
                raise ComponentError(f"{NAME} never became healthy; see {log_path(NAME)}")
            time.sleep(0.5)
    except ComponentError:
        stop_pid(NAME)
        raise


def stop() -> None:
    stop_pid(NAME)


def status() -> str:
    pid = read_pid(NAME)
    if pid is None:
        return f"{NAME}: stopped"
    state = "running" if _healthy() else "starting (not healthy yet)"
    return f"{NAME}: {state} pid {pid} on http://{HOST}:{PORT}, rss {rss_kib(pid) // 1024} MiB"


def env() -> dict[str, str]:
    return {"PREFECT_API_URL": f"http://{HOST}:{PORT}/api"}
