"""Fixtures shared by the unit tests (nothing runs: no Kafka, Girder or Prefect).
The fakes themselves live in :mod:`tests.unit.fakes`, importable by any test."""

from __future__ import annotations

import pytest

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
