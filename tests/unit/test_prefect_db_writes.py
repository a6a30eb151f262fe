"""Fewer writes to the Prefect database per file (issue 15, item 3): ready files linger
to share an upload unit (one task run), a few files are not striped over every free
worker, and the task engine's "Finished in state Completed()" line of our tasks is
dropped."""

from __future__ import annotations

import logging

import pytest

from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.ledger.units import UploadUnit
from girder_upload_stream.prefect_glue.artifacts import (PROGRESS_INTERVAL_SECONDS,
                                                         TABLES_INTERVAL_SECONDS)
from girder_upload_stream.prefect_glue.task_logs import (CompletedTaskRunFilter,
                                                         quiet_completed_task_runs)
from tests.unit.fakes import Clock, Log, encoded, outcomes
from tests.unit.fakes import make_processor as make


def feed(proc: StreamProcessor, log: Log, names: list[str], size: int = 64) -> None:
    for i, name in enumerate(names):
        for key, value in encoded(name.encode() * 4, name, size=size):
            proc.handle(log.put(i % 2, key, value))


def names_of(units: list[UploadUnit]) -> list[list[str]]:
    return [[f.rel_path for f in unit.files] for unit in units]


# ---------------------------------------------------------------- lingering


def test_ready_files_wait_for_company_then_go_together() -> None:
    clock, log = Clock(), Log()
    proc = make(clock=clock, max_inflight_units=2, linger_seconds=5.0)
    feed(proc, log, ["a", "b"])
    assert proc.take_units() == [] and not proc.idle  # waiting, not forgotten
    clock.now += 3
    feed(proc, log, ["c"])
    assert proc.take_units() == []
    clock.now += 2  # 5 s after the first became ready: all three, in one unit
    assert names_of(proc.take_units()) == [["a", "b", "c"]]


def test_the_linger_starts_again_after_a_unit_left() -> None:
    clock, log = Clock(), Log()
    proc = make(clock=clock, max_inflight_units=2, linger_seconds=5.0)
    feed(proc, log, ["a"])
    proc.take_units()
    clock.now += 5
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit))
    feed(proc, log, ["b"])
    assert proc.take_units() == []
    clock.now += 4.9
    assert proc.take_units() == []
    clock.now += 0.1
    assert names_of(proc.take_units()) == [["b"]]


def test_a_full_unit_never_waits() -> None:
    clock, log = Clock(), Log()
    proc = make(clock=clock, max_inflight_units=2, max_unit_files=3, linger_seconds=60.0)
    feed(proc, log, ["a", "b", "c", "d"])
    # Four files fill one unit of three and need a second: both go now, striped.
    units = proc.take_units()
    assert len(units) == 2 and sorted(sum(names_of(units), [])) == ["a", "b", "c", "d"]


def test_a_unit_full_by_bytes_never_waits() -> None:
    clock, log = Clock(), Log()
    proc = make(clock=clock, max_inflight_units=2, max_unit_bytes=16, linger_seconds=60.0)
    feed(proc, log, ["big"])  # 12 bytes
    assert proc.take_units() == []
    feed(proc, log, ["more"])  # 16 bytes: together past the limit
    units = proc.take_units()
    assert sorted(sum(names_of(units), [])) == ["big", "more"]


def test_files_kept_back_by_busy_workers_do_not_linger_again() -> None:
    clock, log = Clock(), Log()
    proc = make(clock=clock, max_inflight_units=1, max_unit_files=2, linger_seconds=5.0)
    feed(proc, log, ["a", "b", "c"])
    [first] = proc.take_units()  # two files fill a unit: at once; "c" is left over
    assert names_of([first]) == [["a", "b"]]
    proc.finish_unit(first, outcomes(first))
    assert names_of(proc.take_units()) == [["c"]]  # it waited already


def test_without_linger_every_ready_file_goes_at_once() -> None:
    log = Log()
    proc = make(max_inflight_units=2)
    feed(proc, log, ["a"])
    assert names_of(proc.take_units()) == [["a"]]


# ---------------------------------------------------------------- no needless striping


def test_a_few_files_make_one_unit_even_with_free_workers() -> None:
    log = Log()
    proc = make(max_inflight_units=4, max_unit_files=64)
    feed(proc, log, [f"f{i}" for i in range(10)])
    assert len(proc.take_units()) == 1


def test_many_files_are_still_striped_over_the_free_workers() -> None:
    log = Log()
    proc = make(max_inflight_units=2, max_unit_files=3)
    feed(proc, log, [f"f{i}" for i in range(5)])
    units = proc.take_units()
    assert len(units) == 2 and sum(len(u.files) for u in units) == 5


# ---------------------------------------------------------------- the completed line


def record(msg: str, level: int = logging.INFO, task: str | None = "upload-to-girder"
           ) -> logging.LogRecord:
    rec = logging.LogRecord("prefect.task_runs", level, __file__, 1, msg, None, None)
    if task is not None:
        rec.task_name = task
    return rec


@pytest.mark.parametrize("rec, kept", [
    (record("Finished in state Completed()"), False),
    (record("Finished in state Completed()", task="find-in-girder"), False),
    (record("Finished in state Completed()", task="someone-else"), True),
    (record("Finished in state Completed()", task=None), True),
    (record("Finished in state Failed('boom')", level=logging.ERROR), True),
    (record("Task run failed with TransientError: x - Retry 1/3 will start 2 second(s) from now"),
     True),
])
def test_only_the_completed_line_of_our_tasks_is_dropped(rec, kept) -> None:
    assert CompletedTaskRunFilter().filter(rec) is kept


def test_the_filter_is_on_the_task_run_logger_only_while_inside(caplog) -> None:
    logger = logging.getLogger("prefect.task_runs")
    caplog.set_level(logging.INFO, logger="prefect.task_runs")
    extra = {"task_name": "upload-to-girder"}
    with quiet_completed_task_runs():
        logger.info("Finished in state Completed()", extra=extra)
        logger.info("kept", extra=extra)
    logger.info("Finished in state Completed()", extra=extra)
    assert [r.getMessage() for r in caplog.records] == ["kept", "Finished in state Completed()"]


def test_artifact_intervals() -> None:
    assert TABLES_INTERVAL_SECONDS == 300 and PROGRESS_INTERVAL_SECONDS == 60


# ---------------------------------------------------------------- the local server's vacuum


def test_the_local_servers_retention_settings_are_prefects(monkeypatch) -> None:
    """stack/prefect_server.py's RETENTION parses as Prefect's own settings (names and
    formats: an ISO 8601 duration, seconds, a JSON dict of seconds)."""
    from datetime import timedelta

    from prefect.settings import Settings

    from stack.prefect_server import RETENTION
    for name, value in RETENTION.items():
        monkeypatch.setenv(name, value)
    server = Settings().server
    vacuum = server.services.db_vacuum
    assert vacuum.enabled_vacuum_types == {"events", "flow_runs", "orphans"}
    assert vacuum.loop_seconds == 600 and vacuum.retention_period == timedelta(days=1)
    assert server.events.retention_period == timedelta(days=1)
    assert vacuum.event_retention_overrides["prefect.task-run.Completed"] == timedelta(hours=1)
    assert vacuum.event_retention_overrides["prefect.flow-run.heartbeat"] == timedelta(days=1)
