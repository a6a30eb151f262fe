"""Who may use the stack while a test stops or restarts one of its components.

With ``pytest -n N`` several processes run integration tests at once. A test that stops
a shared component (Kafka, Girder: tests marked ``serial``) must have the stack alone;
all other tests share it. This is a readers-writer lock over processes, made of two
``flock`` files in the run's folder (tests/conftest.py): a test that needs the stack
alone first closes a turnstile, so no new test starts, then waits for the running ones
to end; the others pass the turnstile and hold the shared lock while they run. Without
xdist the locks are never contended.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from tests.conftest import run_dir

__all__ = ["flock", "shared", "alone"]


@contextlib.contextmanager
def flock(name: str, mode: int) -> Iterator[None]:
    """Hold ``flock(mode)`` on the run folder's file ``name`` (shared by every worker)."""
    with open(run_dir() / name, "a+b") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Use the stack beside other tests (never beside one that has it alone)."""
    with flock("turnstile.lock", fcntl.LOCK_EX):
        pass
    with flock("stack-share.lock", fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Have the stack alone: no other test uses it until the block ends."""
    with flock("turnstile.lock", fcntl.LOCK_EX), flock("stack-share.lock", fcntl.LOCK_EX):
        yield
