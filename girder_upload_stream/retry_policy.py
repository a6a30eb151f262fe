"""The one retry policy of uploads: what a failure is (by its class), whether a file is
tried again, and after how long.

Every upload goes through one path: the ledger packs files into a unit, an executor
(:mod:`~girder_upload_stream.loop.executor`: Prefect task runs or plain threads) runs
the unit *once*, and each file of it that failed transiently goes back to the ledger,
which tries it again after :meth:`RetryPolicy.delay` (``ledger/uploading.py``). No
executor retries by itself, so a run behaves alike with or without Prefect.

The schedule (seconds, from :mod:`~girder_upload_stream.timings`, so tests shorten it):
the first retries of a file wait ``upload_retry_delays`` (2, 10, 30); each later one
waits twice the one before, capped at ``upload_retry_max_seconds`` (300): 2, 10, 30,
60, 120, 240, 300, 300... The cap bounds the wait, not the attempts: a transient
failure never fails a file for good (that would drop it or commit past it), so a
file is tried at least every ``upload_retry_max_seconds`` while the run lasts, its
messages stay uncommitted, and a run that stops leaves it to the next run.

Failures are told apart by class (:mod:`girder_upload_stream.errors`), never by text:
see :func:`classify`. Standard library and the project's error classes only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from girder_upload_stream import timings
from girder_upload_stream.errors import (AuthenticationError, FatalError, TerminalError,
                                         TransientError, UnreachableError)

__all__ = ["Failure", "classify", "RetryPolicy"]


class Failure(enum.Enum):
    """What a failure means for the work that met it."""

    #: The input itself is wrong (a 4xx, an invalid name): record it, never retry.
    TERMINAL = "terminal"
    #: The server answered that it cannot now (429, 5xx): retry this one later; the
    #: other work of a batch still goes on.
    TRANSIENT = "transient"
    #: No answer at all: retry later; the rest of a batch would only wait too.
    UNREACHABLE = "unreachable"
    #: The credentials were refused: retry later (the client logs in again); the rest
    #: of a batch would meet it too.
    AUTHENTICATION = "authentication"
    #: The run cannot go on (e.g. the root folder given by id is gone): it stops; the
    #: work stays uncommitted for the next run.
    FATAL = "fatal"
    #: Not one of ours (a bug, an unforeseen library error): retried like a transient
    #: failure, since giving up would drop the file or commit past it.
    UNEXPECTED = "unexpected"

    @property
    def retried(self) -> bool:
        """Whether the file is tried again in this run."""
        return self not in (Failure.TERMINAL, Failure.FATAL)

    @property
    def stops_the_batch(self) -> bool:
        """Whether the other files of a unit would meet it too (so they are not tried)."""
        return self in (Failure.UNREACHABLE, Failure.AUTHENTICATION, Failure.FATAL,
                        Failure.UNEXPECTED)


#: Most specific class first: an authentication or unreachable error is transient too.
_CLASSES: tuple[tuple[type[BaseException], Failure], ...] = (
    (AuthenticationError, Failure.AUTHENTICATION),
    (UnreachableError, Failure.UNREACHABLE),
    (TransientError, Failure.TRANSIENT),
    (TerminalError, Failure.TERMINAL),
    (FatalError, Failure.FATAL),
)


def classify(exc: BaseException) -> Failure:
    """What ``exc`` means, by its class alone."""
    for cls, failure in _CLASSES:
        if isinstance(exc, cls):
            return failure
    return Failure.UNEXPECTED


@dataclass(frozen=True)
class RetryPolicy:
    """When a file whose upload failed transiently is tried again (see the module)."""

    #: Waits before the first retries, in order.
    delays: tuple[float, ...] = timings.Timings().upload_retry_delays
    #: The longest wait between two attempts of a file.
    max_delay: float = timings.Timings().upload_retry_max_seconds

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays) or self.max_delay < 0:
            raise ValueError(f"retry delays must be zero or more seconds: {self}")

    @classmethod
    def current(cls) -> RetryPolicy:
        """The policy of the timings in force (:func:`timings.current`)."""
        t = timings.current()
        return cls(t.upload_retry_delays, t.upload_retry_max_seconds)

    @classmethod
    def constant(cls, seconds: float) -> RetryPolicy:
        """Every retry after ``seconds`` (for tests of the ledger on a fake clock)."""
        return cls((seconds,), seconds)

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt of a file that failed ``failures`` times in a
        row (1 for the first failure): the listed delays, then each one twice the one
        before, never more than :attr:`max_delay`."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, not {failures}")
        if not self.delays:
            return self.max_delay
        if failures <= len(self.delays):
            return min(self.delays[failures - 1], self.max_delay)
        doublings = min(failures - len(self.delays), 64)  # 2**64 passes any cap
        return min(self.delays[-1] * 2 ** doublings, self.max_delay)

    def schedule(self, n: int) -> list[float]:
        """The first ``n`` waits, as the docs list them."""
        return [self.delay(k) for k in range(1, n + 1)]
