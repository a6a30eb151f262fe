"""Where a consumer's start-up time goes: named marks, in seconds since the process
started, logged as one line when the first message is read, again when the first
file is in Girder, and (a command-line run with a Prefect API) when its flow run
takes it over.

The clock's zero is the process's own start (``/proc/self/stat``, Linux), so the time
the interpreter takes before any of our code runs is counted too; elsewhere it is the
moment this module was imported. ``scenario 8`` of ``benchmarks/run_all.py`` reads the
logged lines. Standard library only, and cheap: the command line imports it first.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["process_age", "Timeline", "TIMELINE", "mark", "FIRST_MESSAGE", "FIRST_FILE",
           "FLOW_RUN_ATTACHED", "MILESTONES"]

logger = logging.getLogger(__name__)

FIRST_MESSAGE = "first message read"
FIRST_FILE = "first file in Girder"
#: A command-line run with a Prefect API: its flow run took it over (usually after the
#: first file: prefect_glue/late_flow_run.py).
FLOW_RUN_ATTACHED = "flow run attached"
#: The marks that log the timeline line.
MILESTONES = (FIRST_MESSAGE, FIRST_FILE, FLOW_RUN_ATTACHED)


def _process_started_monotonic() -> float:
    """``time.monotonic()`` at the process's start, read from the kernel (the start
    time in clock ticks since boot, and the seconds since boot now); the import time
    of this module where /proc is not there."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        with open("/proc/uptime", "rb") as uptime:
            since_boot = float(uptime.read().split()[0])
        age = since_boot - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - max(0.0, age)


_STARTED = _process_started_monotonic()


def process_age() -> float:
    """Seconds since this process started."""
    return time.monotonic() - _STARTED


class Timeline:
    """Named marks of one process's start-up (the first of each name counts)."""

    def __init__(self) -> None:
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, name: str) -> bool:
        """Record ``name`` now, unless it was recorded before; True if it is new. The
        :data:`MILESTONES` also log the line."""
        with self._lock:
            if name in self._marks:
                return False
            self._marks[name] = process_age()
        if name in MILESTONES:
            logger.info("start-up: %s", self.describe())
        return True

    def marks(self) -> dict[str, float]:
        with self._lock:
            return dict(self._marks)

    def describe(self) -> str:
        """``name at 1.23 s; ...`` in the order the marks were made (seconds since
        the process started)."""
        return "; ".join(f"{name} at {seconds:.2f} s" for name, seconds in self.marks().items())


#: The process's timeline (start-up is a property of the process, not of one run).
TIMELINE = Timeline()


def mark(name: str) -> bool:
    """Record ``name`` on the process's timeline (see :meth:`Timeline.mark`)."""
    return TIMELINE.mark(name)
