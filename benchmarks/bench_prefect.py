"""Prefect-side measurements of our consumer: its flow runs, their task runs, and how
much the Prefect server's SQLite database grows.

The database is measured by its logical size (``page_count - freelist_count`` pages,
read through a read-only SQLite connection, which sees the write-ahead log too), not by
the file's size on disk, which only grows in steps and never shrinks. Other clients of
the same Prefect server would add to the growth; the benchmarks assume none.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from benchmarks.bench_common import PREFECT_DB, Stack

__all__ = ["db_logical_bytes", "flow_run_ids", "task_runs", "server_version"]

_FLOW_RUN = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")


def db_logical_bytes(path: Path = PREFECT_DB) -> int | None:
    """Bytes of live pages in the Prefect database (None if it cannot be read)."""
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size
    except sqlite3.Error:
        return None


def flow_run_ids(output: str) -> list[str]:
    """Flow run ids named in a consumer's output (``View at .../runs/flow-run/ID``)."""
    return sorted(set(_FLOW_RUN.findall(output)))


def task_runs(stack: Stack, ids: list[str]) -> int | None:
    """How many task runs the server recorded for these flow runs."""
    if not ids:
        return None
    import httpx
    response = httpx.post(f"{stack.prefect_url}/task_runs/count",
                          json={"flow_runs": {"id": {"any_": ids}}}, timeout=30)
    response.raise_for_status()
    return int(response.json())


def server_version(stack: Stack) -> str:
    import httpx
    try:
        response = httpx.get(f"{stack.prefect_url}/admin/version", timeout=10)
        response.raise_for_status()
        return str(response.json())
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"
