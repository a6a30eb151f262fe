"""Fixtures shared by the unit tests (nothing runs: no Kafka, Girder or Prefect).
The fakes themselves live in :mod:`tests.unit.fakes`, importable by any test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from girder_upload_stream import timings
from tests.unit.fakes import Clock, Log


@pytest.fixture
def clock() -> Clock:
    """The processor's and runner's monotonic clock, moved by hand."""
    return Clock()


@pytest.fixture
def wall_clock() -> Clock:
    """Epoch time for message times and stale-partial checks, moved by hand."""
    return Clock(5000.0)


@pytest.fixture
def log() -> Log:
    """A fake topic of four partitions that hands out offsets."""
    return Log()


@pytest.fixture
def timing() -> Iterator[Callable[..., timings.Timings]]:
    """``timing(shutdown_grace_seconds=1.0)``: this test runs with some of the run's
    timings (girder_upload_stream/timings.py) changed, through the same configuration
    production reads; undone at the end of the test."""
    with ExitStack() as stack:
        yield lambda **values: stack.enter_context(timings.overridden(**values))
