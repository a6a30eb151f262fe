"""What one upload unit and one Girder lookup do, and the run's pool of small-file
uploads that units share. Both ways of running them (Prefect task runs or plain
threads, :mod:`~girder_upload_stream.loop.executor`) call these same functions once
per job; retries are the ledger's, after :mod:`~girder_upload_stream.retry_policy`'s
delays, so a run behaves alike whether Prefect records it or not. No Prefect import.

``--n_threads`` units run at once (task runs, or ``ThreadUploads``' threads); the
small files of every running unit go side by side through one :class:`FileUploads`,
as many in flight as its :class:`~girder_upload_stream.loop.concurrency.AdaptiveLimit`
allows (``--n_threads`` at first, then more while Girder keeps up, up to
``--max_parallel_uploads``, fewer when its latency grows or it refuses uploads): a
Girder far away is then kept busy without more units (task runs), and a slow or
failing one is not flooded. Big files (and streamed ones) go one at a time in their
unit's thread, as the memory budget plans for ``--n_threads`` upload blocks.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from girder_upload_stream.shared_types import CompletedFile, FileOutcome, Outcome
from girder_upload_stream.errors import TerminalError, TransientError
from girder_upload_stream.ledger.units import (UploadUnit, is_shared, items_shared,
                                               report_outcome)
from girder_upload_stream.loop.concurrency import AdaptiveLimit, InFlightGate
from girder_upload_stream.request_tally import requests_made
from girder_upload_stream.retry_policy import Failure, classify
from girder_upload_stream.wire.codec import FileKey

__all__ = ["SIDE_BY_SIDE_MAX_BYTES", "upload_files", "find_files", "FileUploads"]


#: Files up to this size upload side by side (:class:`FileUploads`): their time is
#: mostly round trips; larger ones are bound by bytes and by the memory budget.
SIDE_BY_SIDE_MAX_BYTES = 4 << 20


def upload_files(unit: UploadUnit, store: Any, files: FileUploads | None = None
                 ) -> list[FileOutcome]:
    """Upload every file of ``unit``, once. Terminal problems come back as outcomes;
    transient ones raise, and the ledger tries the unit's unsettled files again later
    (retry_policy.py). When Girder answered (a 5xx or 429 for one file), the unit's
    other files are tried first: one file Girder keeps refusing must not hold back the
    files packed with it. When the failure would meet every file (Girder unreachable,
    a refused token: :attr:`Failure.stops_the_batch`), it is raised at once. ``store``
    is the run's :class:`~girder_upload_stream.girder.store.GirderStore`. A file
    streamed into Girder while it arrived is finished by its session
    (girder/streaming.py): the rest of its bytes once verified, then its metadata; a
    later attempt resumes at Girder's offset. With ``files`` (the run's
    :class:`FileUploads`), the unit's small files upload side by side there while this
    thread takes the others one by one."""
    side, own = _split(unit, files)
    futures = [(c, files.submit(lambda c=c: _upload_one(unit, store, c))) for c in side] \
        if files is not None else []
    outcomes: list[FileOutcome] = []
    deferred: TransientError | None = None
    try:
        for completed in own:
            deferred = _settle(unit, completed, lambda c=completed: _upload_one(unit, store, c),
                               outcomes, deferred)
        for completed, future in futures:
            deferred = _settle(unit, completed, future.result, outcomes, deferred)
    finally:
        for _, future in futures:  # stopped early: the rest would only wait too
            future.cancel()
    if deferred is not None:
        raise deferred
    return outcomes


def _split(unit: UploadUnit, files: FileUploads | None
           ) -> tuple[list[CompletedFile], list[CompletedFile]]:
    """The unit's files that go side by side (small, not streamed, the first of their
    path in the unit: a file produced again waits for its earlier copy) and the rest,
    which this thread uploads one by one, in order."""
    if files is None or len(unit.files) < 2:
        return [], list(unit.files)
    side, own, paths = [], [], set()
    for completed in unit.files:
        if (completed.file_key in unit.streams or completed.size > files.max_file_bytes
                or completed.rel_path in paths):
            own.append(completed)
        else:
            side.append(completed)
        paths.add(completed.rel_path)
    return side, own


def _upload_one(unit: UploadUnit, store: Any, completed: CompletedFile) -> FileOutcome:
    stream = unit.streams.get(completed.file_key)  # streamed while it arrived
    if stream is not None:
        return stream.finish(completed, shared=lambda: is_shared(unit))
    return store.upload(completed, shared=lambda: items_shared(unit),
                        folders_shared=lambda: is_shared(unit),
                        known_there=completed.file_key in unit.known_there)


def _settle(unit: UploadUnit, completed: CompletedFile, attempt: Callable[[], FileOutcome],
            outcomes: list[FileOutcome], deferred: TransientError | None
            ) -> TransientError | None:
    """Run or wait for one file's upload: its outcome reported and kept, or the first
    transient error Girder answered kept for the end (one that stops the batch raised
    at once). A terminal error raised for the file is its outcome (failed for good)."""
    try:
        outcome = attempt()
    except TerminalError as exc:
        outcome = FileOutcome(completed.rel_path, completed.file_key, Outcome.FAILED_TERMINAL,
                              str(exc))
    except TransientError as exc:
        if classify(exc).stops_the_batch:
            raise
        return deferred or exc
    report_outcome(unit, outcome)  # settles it before the unit ends
    outcomes.append(outcome)
    return deferred


def find_files(keys: list[FileKey], store: Any) -> list[tuple[FileKey, bool | None]]:
    """After a restart: which re-read files Girder already holds (by name and sha512).
    No retries: an unanswered key (None) is asked again by the loop later."""
    return [(key, store.holds(key[0], key[1])) for key in keys]


class FileUploads:
    """One run's small-file uploads, side by side, as many in flight as its adaptive
    limit allows (see the module's text); ``with`` ends it (waits for the running
    uploads, drops the queued ones: their units raise, and are retried or recorded).
    ``gate.max_in_flight`` is the most uploads that were in flight at once."""

    def __init__(self, initial: int, maximum: int,
                 max_file_bytes: int = SIDE_BY_SIDE_MAX_BYTES) -> None:
        maximum = max(maximum, initial)
        self.initial = initial
        self.gate = InFlightGate(AdaptiveLimit(initial, minimum=1, maximum=maximum))
        self.max_file_bytes = max_file_bytes
        self._executor = ThreadPoolExecutor(max_workers=maximum,
                                            thread_name_prefix="girder-upload")

    def __enter__(self) -> FileUploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, upload: Callable[[], FileOutcome]) -> Future:
        return self._executor.submit(self._gated, upload)

    def _gated(self, upload: Callable[[], FileOutcome]) -> FileOutcome:
        token = self.gate.acquire()
        before = requests_made()
        ok: bool | None = None
        try:
            outcome = upload()
            ok = True  # an answer, even a refusal of this one file (a 4xx)
            return outcome
        except TransientError as exc:
            # 429, 5xx or no answer: Girder is overloaded or failing. A refused token
            # says nothing about its load.
            ok = None if classify(exc) is Failure.AUTHENTICATION else False
            raise
        finally:
            # Per request: an upload that looks for a twin or makes a folder makes
            # more requests, and is longer for it, with Girder no slower.
            self.gate.release(token, ok, requests=requests_made() - before)
