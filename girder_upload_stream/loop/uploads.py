"""What one upload unit and one Girder lookup do, their retry policy, and the plain
thread pool that runs them when no Prefect API is configured.

The Prefect tasks of :mod:`girder_upload_stream.tasks.upload` call the same two
functions with the same policy (the retry delays of :mod:`~girder_upload_stream.timings`,
:func:`is_retryable`), so a run
behaves alike whether Prefect records it or not. No Prefect import here.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from girder_upload_stream import timings
from girder_upload_stream.errors import TransientError
from girder_upload_stream.girder.errors import GirderAuthError
from girder_upload_stream.ledger.units import FileOutcome, UploadUnit, is_shared, report_outcome
from girder_upload_stream.wire.codec import FileKey

__all__ = ["RETRY_DELAYS", "is_retryable", "upload_files", "find_files", "ThreadUploads"]

logger = logging.getLogger(__name__)

#: Seconds before each retry of an upload unit that raised a transient error, in
#: production; a run uses ``upload_retry_delays`` of :func:`timings.current`.
RETRY_DELAYS: tuple[float, ...] = timings.Timings().upload_retry_delays


def is_retryable(exc: BaseException) -> bool:
    """Only transient errors are retried (Girder down, 429, 5xx, a refused token)."""
    return isinstance(exc, TransientError)


def upload_files(unit: UploadUnit, store: Any) -> list[FileOutcome]:
    """Upload every file of ``unit``; terminal problems come back as outcomes, transient
    ones raise so that the unit is retried. When Girder answered (a 5xx or 429 for
    one file), the unit's other files are tried first: one file Girder keeps refusing
    must not hold back the files packed with it. When Girder could not be reached, the
    error is raised at once (the other files would only wait for it too). ``store`` is
    the run's :class:`~girder_upload_stream.girder.store.GirderStore`. A file streamed
    into Girder while it arrived is finished by its session (girder/streaming.py): the
    rest of its bytes once verified, then its metadata; a retry resumes at Girder's
    offset."""
    outcomes = []
    deferred: TransientError | None = None
    for completed in unit.files:
        stream = unit.streams.get(completed.file_key)  # streamed while it arrived
        try:
            if stream is not None:
                outcome = stream.finish(completed, shared=lambda: is_shared(unit))
            else:
                outcome = store.upload(completed, shared=lambda: is_shared(unit))
        except TransientError as exc:
            if not _girder_answered(exc):
                raise
            deferred = deferred or exc
            continue
        report_outcome(unit, outcome)  # settles it before the unit ends
        outcomes.append(outcome)
    if deferred is not None:
        raise deferred
    return outcomes


def _girder_answered(exc: TransientError) -> bool:
    """True for an HTTP answer (5xx, 429) about one request; False for an unreachable
    Girder (connection refused or reset, a timeout: see the texts of
    girder_upload_stream/girder/errors.py) and for a refused token, which every other
    file would meet too."""
    return not isinstance(exc, GirderAuthError) and "Girder unreachable" not in exc.message


def find_files(keys: list[FileKey], store: Any) -> list[tuple[FileKey, bool | None]]:
    """After a restart: which re-read files Girder already holds (by name and sha512).
    No retries: an unanswered key (None) is asked again by the loop later."""
    return [(key, store.holds(key[0], key[1])) for key in keys]


class ThreadUploads:
    """Upload units and lookups on ``n_threads`` threads, without Prefect: the policy
    of the Prefect tasks (retries after ``upload_retry_delays`` for transient errors
    only; lookups never retried). Leaving the ``with`` block cancels what has not
    started, ends retry waits and waits for the units still running, as Prefect's
    ``ThreadPoolTaskRunner`` does."""

    def __init__(self, n_threads: int, delays: tuple[float, ...] | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="upload")
        self._closing = threading.Event()
        self._delays = timings.current().upload_retry_delays if delays is None else delays

    def __enter__(self) -> ThreadUploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit_upload(self, unit: UploadUnit, store: Any) -> Future:
        return self._executor.submit(self._with_retries, lambda: upload_files(unit, store),
                                     f"upload unit {unit.unit_id} ({unit.nbytes} bytes)")

    def submit_probe(self, keys: list[FileKey], store: Any) -> Future:
        return self._executor.submit(find_files, keys, store)

    def _with_retries(self, attempt: Callable[[], list[FileOutcome]], name: str
                      ) -> list[FileOutcome]:
        for number, delay in enumerate((*self._delays, None), start=1):
            try:
                return attempt()
            except Exception as exc:
                if delay is None or not is_retryable(exc) or self._closing.is_set():
                    raise
                logger.warning("%s failed (%s); retry %d/%d in %g s", name, exc, number,
                               len(self._delays), delay)
                if self._closing.wait(delay):
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises
