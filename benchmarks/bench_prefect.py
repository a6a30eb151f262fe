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

__all__ = ["db_logical_bytes", "table_bytes", "table_rows", "growth_by_table", "flow_run_ids",
           "task_runs", "server_version"]

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


def table_bytes(path: Path = PREFECT_DB) -> dict[str, int]:
    """Bytes of each table of the Prefect database, its indexes included (SQLite's
    ``dbstat``: payload plus unused space of its pages); empty if it cannot be read."""
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            owner = {name: table for name, table in db.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')")}
            sizes: dict[str, int] = {}
            for name, size in db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                table = owner.get(name, name)
                sizes[table] = sizes.get(table, 0) + int(size)
        return sizes
    except sqlite3.Error:
        return {}


def table_rows(path: Path = PREFECT_DB, tables: tuple[str, ...] = (
        "task_run", "task_run_state", "flow_run_state", "log", "events", "event_resources",
        "artifact", "artifact_collection")) -> dict[str, int]:
    """Row counts of the tables our runs write to (missing tables are left out)."""
    if not path.exists():
        return {}
    counts = {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            for table in tables:
                try:
                    counts[table] = db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
                except sqlite3.Error:
                    continue
    except sqlite3.Error:
        return {}
    return counts


def growth_by_table(before: dict[str, int], after: dict[str, int], top: int = 8
                    ) -> list[tuple[str, int]]:
    """The tables that grew most from ``before`` to ``after``: ``[(table, bytes)]``."""
    grown = [(name, after[name] - before.get(name, 0)) for name in after]
    return sorted((g for g in grown if g[1] > 0), key=lambda g: -g[1])[:top]


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
