"""Fewer log rows per task run in the Prefect database.

Prefect's task engine logs ``Finished in state Completed()`` (INFO, logger
``prefect.task_runs``) at the end of every task run, and its API log handler stores each
as a row of the server's ``log`` table (about 1.2 KiB with its indexes). A stream of
small files makes hundreds of upload task runs an hour whose completed state is already
recorded with the task run itself, so :func:`quiet_completed_task_runs` drops exactly
that line, for our tasks only, while a flow runs. Every other line (retries, failures,
a task that ends in any other state, the flow run's own "Finished in state") is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["QUIET_TASKS", "CompletedTaskRunFilter", "quiet_completed_task_runs"]

#: Names of the tasks whose completed line is dropped (tasks/upload.py).
QUIET_TASKS = frozenset({"upload-to-girder", "find-in-girder"})
_LOGGER = "prefect.task_runs"


class CompletedTaskRunFilter(logging.Filter):
    """Drops the INFO line ``Finished in state Completed(...)`` of :data:`QUIET_TASKS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or getattr(record, "task_name", None) not in QUIET_TASKS:
            return True
        return not str(record.msg).startswith("Finished in state Completed(")


@contextmanager
def quiet_completed_task_runs() -> Iterator[None]:
    """Install :class:`CompletedTaskRunFilter` on ``prefect.task_runs`` while inside."""
    logger, quiet = logging.getLogger(_LOGGER), CompletedTaskRunFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
