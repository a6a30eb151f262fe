"""Write file fates into the registries (OpenMSIStream's CSV tables under LOGS/).

The in-progress table lists files being rebuilt or failed (``failed``,
``mismatched_hash``) with the reason in the sidecar's ``extra``; the processed table
lists every file put in Girder (or found there), once per time it was produced.
Tables are saved atomically every few seconds and at shutdown by
:class:`RegistrySaver`, so the files are accurate to within that interval. A save that
fails (full disk, no permission) never stops the stream: :meth:`RegistryRecorder.try_save`
logs it once per streak of failures and says so, so that offset commits (which need the
save first) wait until a save works again.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from datetime import datetime
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from girder_upload_stream.wire.codec import Chunk
from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.shared_types import (CompletedFile, FileOutcome, FileProgress, Outcome,
                                               RETRIED_NEXT_RUN, RawMessage, Recorder,
                                               RejectedFile, file_generation)
from girder_upload_stream.registry.tables import (STATUS_FAILED, STATUS_IN_PROGRESS,
                                           STATUS_MISMATCHED_HASH, InProgressRow,
                                           InProgressTable, ProcessedRow, ProcessedTable,
                                           RowKey, consolidate, in_progress_path,
                                           part_files, processed_path, read_processed,
                                           seed_in_progress_path)
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.registry.csv_files import DELIMITER, check_header, header_line
from girder_upload_stream.registry.rows import IN_PROGRESS_COLUMNS, PROCESSED_COLUMNS
from girder_upload_stream.text_bounds import LIMIT, bounded

__all__ = ["RegistryRecorder", "RegistrySaver", "RegistryFileError", "check_registry_files"]

logger = logging.getLogger(__name__)

#: Rows kept for single rejected messages (undecodable, unsafe name...); beyond, the
#: rejections are counted in one summary row (:data:`OVERFLOW_NAME`), so a flood of bad
#: messages cannot grow the registry without bound. Rows of messages that could not be
#: decrypted are not capped: each holds its offset uncommitted.
MAX_REJECTED_MESSAGE_ROWS = 1000
OVERFLOW_NAME = "rejected messages beyond the registry's limit"
OVERFLOW_GENERATION = "offset-overflow"
#: Characters of a path kept in the row of a rejected file (longer: cut, with a digest).
PATH_LIMIT = 500


def _never_raise(method: Callable[..., None]) -> Callable[..., None]:
    """Registry bookkeeping must never stop the stream: log and go on."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            logger.error("registry entry not recorded (%s): %s", method.__name__, exc)
    return wrapper


def _holds_messages(row: InProgressRow) -> bool:
    """A row whose file's messages are read again by a restart: in progress, its upload
    failed transiently (retried), or failed for good and listed for the next run
    (offsets rule 9). Rejected and released files hold nothing."""
    reason = str(row.extra.get("reason", ""))
    return row.status == STATUS_IN_PROGRESS or (
        row.status == STATUS_FAILED
        and (reason.startswith(Outcome.FAILED_TRANSIENT.value)
             or reason.endswith(RETRIED_NEXT_RUN)))


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch)


class RegistryFileError(ConfigError):
    """A registry file the consumer cannot read at all (its first line is not the
    header it writes): the run stops before it starts, changing nothing (exit status 2
    from the command line), rather than guess what the file's columns mean."""


def _unreadable(path: Path, columns: Any) -> RegistryFileError:
    with path.open("rb") as stream:
        first = stream.readline(2000).rstrip(b"\r\n").decode("utf-8", "replace")
    other = next((sep for sep in (",", "\t") if sep in first and DELIMITER not in first), None)
    hint = (f"its fields are separated by {other!r} (saved by a spreadsheet?), "
            f"OpenMSIStream's by {DELIMITER!r}" if other else
            f"its first line is {bounded(first)!r}")
    return RegistryFileError(
        f"cannot start: the registry file {path} cannot be read ({hint}; expected the "
        f"header {header_line(columns)!r}). Nothing was changed. Put the header back, or "
        f"save the file as OpenMSIStream wrote it, or move it out of the folder to start "
        f"without it (files already in Girder are then found there, not uploaded twice)")


def check_registry_files(folder: Path, topic: str, group: str) -> None:
    """Raise :class:`RegistryFileError` if a registry file of ``topic``/``group`` that
    the run must read has a header other than its own (a file edited by hand or by a
    spreadsheet). Files the run can do without (a part, the older in-progress name) are
    reported and left alone later, as before."""
    for path, columns in ((processed_path(folder, topic, group), PROCESSED_COLUMNS),
                          (in_progress_path(folder, topic, group), IN_PROGRESS_COLUMNS)):
        if path.exists():
            try:
                check_header(path, columns)
            except ValueError:  # RegistryFormatError, or bytes that are not text
                raise _unreadable(path, columns) from None
            except OSError as exc:
                raise RegistryFileError(f"cannot start: the registry file {path} cannot "
                                        f"be read: {exc.strerror}") from None


class RegistryRecorder(Recorder):
    """A :class:`Recorder` that keeps the in-progress and processed tables."""

    def __init__(self, folder: Path, topic: str, group: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.topic, self.group = folder, topic, group
        #: False when this folder held no registry of topic/group yet (a first start, or
        #: a restart on another machine): restart knowledge must come from elsewhere.
        self.had_local_state = (processed_path(folder, topic, group).is_file()
                                or bool(part_files(folder, topic, group))
                                or in_progress_path(folder, topic, group).is_file()
                                or seed_in_progress_path(folder, topic, group).is_file())
        check_registry_files(folder, topic, group)
        merged = consolidate(folder, topic, group)
        for issue in merged.issues:
            logger.warning("registry: %s", issue)
        processed = read_processed(folder, topic, group).rows
        self._processed_keys = {(str(row.rel_filepath), row.generation) for row in processed}
        # Skipped as different: done, but Girder does not hold that content.
        self._in_girder_keys = {(str(row.rel_filepath), row.generation) for row in processed
                                if (row.extra or {}).get("outcome")
                                != Outcome.SKIPPED_DIFFERENT.value}
        self.in_progress = InProgressTable.open(folder, topic, group)
        dropped = self.in_progress.drop_superseded(processed)
        if dropped:
            logger.info("registry: %d in-progress row(s) dropped: their files were "
                        "processed after them", dropped)
        self.processed = ProcessedTable(folder, topic, group, f"p{os.getpid()}")
        #: Rows of single rejected messages (capped at MAX_REJECTED_MESSAGE_ROWS).
        self._rejected_rows = sum(1 for row in self.in_progress.rows()
                                  if row.generation.startswith("offset-")
                                  and row.generation != OVERFLOW_GENERATION)
        #: Where rejected messages go on to (loop/dead_letter.py); None: nowhere.
        self.dead_letters: Any = None
        #: Why the last :meth:`try_save` failed; None when it worked (or none ran yet).
        self.save_error: str | None = None
        self._failed_saves = 0  # in the current streak

    @_never_raise
    def chunk_added(self, chunk: Chunk, partition: int, offset: int) -> None:
        key = RowKey(PurePosixPath(chunk.rel_path), file_generation(chunk.file_hash))
        now = datetime.now()
        old = self.in_progress.get(key)
        # The lowest offset per partition tells, after a restart, whether retention
        # deleted messages this file still needs (messages_gone).
        first = dict(old.extra.get("first_offsets", {})) if old else {}
        first[str(partition)] = min(first.get(str(partition), offset), offset)
        self.in_progress.update(InProgressRow(
            PurePosixPath(chunk.rel_path).name, key.rel_filepath, STATUS_IN_PROGRESS,
            chunk.n_total_chunks, old.first_message if old else now, now, key.generation,
            {**(old.extra if old else {}), "first_offsets": first}))

    @_never_raise
    def file_found(self, progress: FileProgress) -> None:
        """A re-read file found in Girder: processed before (its row may be lost)."""
        rel = PurePosixPath(progress.rel_path)
        key = RowKey(rel, progress.file_hash_hex[:32])
        self.in_progress.remove_processed(key)
        self.processed.add(ProcessedRow(
            rel.name, rel, progress.n_total, _when(progress.first_message_at),
            datetime.now(), key.generation, {"outcome": "found_in_girder"}))

    @_never_raise
    def file_stale(self, progress: FileProgress, reason: str) -> None:
        self._mark_failed(progress.rel_path, progress.file_hash_hex[:32], reason)

    @_never_raise
    def file_dropped(self, progress: FileProgress) -> None:
        """A stray re-sent chunk of a finished file, dropped: nothing to keep."""
        self.in_progress.remove(RowKey(PurePosixPath(progress.rel_path),
                                       progress.file_hash_hex[:32]))

    @_never_raise
    def messages_gone(self, partition: int, first: int, end: int) -> None:
        """Retention deleted offsets ``first``..``end - 1`` of ``partition`` before they
        were finished: files in progress with chunks there can never complete."""
        for row in self.in_progress.rows():
            offsets = row.extra.get("first_offsets", {})
            if _holds_messages(row) and offsets.get(str(partition), end) < end:
                self._mark_failed(str(row.rel_filepath), row.generation,
                                  f"messages gone from the topic: partition {partition} "
                                  f"offsets {first} to {end - 1} were deleted (retention) "
                                  f"before the file was complete")

    def _mark_failed(self, rel_path: str, generation: str, reason: str) -> None:
        key = RowKey(PurePosixPath(rel_path), generation)
        row = self.in_progress.get(key)
        if row is None:
            return
        self.in_progress.update(InProgressRow(
            row.filename, row.rel_filepath, STATUS_FAILED, row.n_chunks, row.first_message,
            row.most_recent_message, row.generation, {**row.extra, "reason": reason}))

    @_never_raise
    def message_rejected(self, msg: RawMessage, error: ChunkDecodeError) -> None:
        """One row per rejected message (its text bounded), up to
        :data:`MAX_REJECTED_MESSAGE_ROWS`; then one summary row counts the rest."""
        topic, partition, offset = msg.source  # the source topic's, when re-keyed
        where = f"message {bounded(topic)}[{partition}]@{offset}"
        now = datetime.now()
        if self.dead_letters is not None and not getattr(error, "keeps_its_row", False):
            if getattr(error, "bytes_in_hand", True):
                self.dead_letters.message(topic, partition, offset, msg.key,
                                          msg.value, error.reason, "message_rejected",
                                          error.rel_path)
            else:
                self.dead_letters.offsets([((msg.topic, msg.partition), msg.offset)],
                                          error.reason, "message_rejected", error.rel_path)
        if not getattr(error, "keeps_its_row", False) and \
                self._rejected_rows >= MAX_REJECTED_MESSAGE_ROWS:
            self._count_overflow(where, error, now)
            return
        name = bounded(error.rel_path, PATH_LIMIT) if error.rel_path else where
        self._rejected_rows += 1
        self.in_progress.update(InProgressRow(
            PurePosixPath(name).name or name, PurePosixPath(name), STATUS_FAILED, 0, now, now,
            f"offset-{partition}-{offset}",
            {"reason": bounded(error.reason, 1000), "partition": partition,
             "offset": offset}))

    def _count_overflow(self, where: str, error: ChunkDecodeError, now: datetime) -> None:
        key = RowKey(PurePosixPath(OVERFLOW_NAME), OVERFLOW_GENERATION)
        old = self.in_progress.get(key)
        count = int(old.extra.get("count", 0)) + 1 if old else 1
        self.in_progress.update(InProgressRow(
            OVERFLOW_NAME, key.rel_filepath, STATUS_FAILED, 0,
            old.first_message if old else now, now, OVERFLOW_GENERATION,
            {"reason": f"{count} more message(s) rejected after the first "
                       f"{MAX_REJECTED_MESSAGE_ROWS}; the last: {where}: "
                       f"{bounded(error.reason, LIMIT)}", "count": count}))

    @_never_raise
    def chunk_rejected(self, msg: RawMessage, reason: str, kind: str = "chunk_rejected",
                       file: str | None = None) -> None:
        """A chunk dropped without a row of its own (its file was rejected before, or it
        is beyond a bound): only the dead-letter topic gets it."""
        if self.dead_letters is not None:
            self.dead_letters.message(*msg.source, msg.key, msg.value, reason, kind, file)

    @_never_raise
    def file_messages_rejected(self, rejected: RejectedFile,
                               where: Sequence[tuple[tuple[str, int], int]]) -> None:
        """The messages of a rejected file, by offset: for the dead-letter topic."""
        if self.dead_letters is not None:
            self.dead_letters.offsets(list(where), rejected.reason, "file_rejected",
                                      rejected.rel_path)

    @_never_raise
    def file_rejected(self, rejected: RejectedFile) -> None:
        status = (STATUS_MISMATCHED_HASH if "hash" in rejected.reason.lower()
                  else STATUS_FAILED)
        rel = PurePosixPath(bounded(rejected.rel_path, PATH_LIMIT))
        self.in_progress.update(InProgressRow(
            rel.name, rel, status,
            rejected.n_total_chunks, _when(rejected.first_message_at),
            _when(rejected.last_message_at), file_generation(rejected.file_hash),
            {"reason": bounded(rejected.reason, 1000)}))

    @_never_raise
    def file_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None:
        rel = PurePosixPath(completed.rel_path)
        key = RowKey(rel, file_generation(completed.file_hash))
        if outcome.outcome in (Outcome.FAILED_TRANSIENT, Outcome.FAILED_TERMINAL):
            old = self.in_progress.get(key)
            self.in_progress.update(InProgressRow(
                rel.name, rel, STATUS_FAILED, completed.n_chunks,
                _when(completed.first_message_at), _when(completed.last_message_at),
                key.generation, {**(old.extra if old else {}),
                                 "reason": f"{outcome.outcome.value}: {outcome.reason}"}))
            return
        self.in_progress.remove_processed(key)
        self.processed.add(ProcessedRow(
            rel.name, rel, completed.n_chunks, _when(completed.first_message_at),
            datetime.now(), key.generation,
            {"outcome": outcome.outcome.value, "sha256": completed.sha256,
             "item_id": outcome.item_id or ""}))

    def pending_keys(self) -> set[tuple[str, str]]:
        """(rel_path, generation) of the files whose messages were pending when the
        table was saved (in progress, or waiting to retry an upload)."""
        return {(str(row.rel_filepath), row.generation) for row in self.in_progress.rows()
                if _holds_messages(row)}

    def processed_keys(self) -> set[tuple[str, str]]:
        """(rel_path, generation) of every file the processed table listed at start
        (restart decisions)."""
        return set(self._processed_keys)

    def in_girder_keys(self) -> set[tuple[str, str]]:
        """The processed files whose content Girder holds (all but those skipped because
        a different file of that name was there)."""
        return set(self._in_girder_keys)

    def save(self, final: bool = False) -> None:
        """Write both tables (if changed, or ``final``); ``final`` also merges the
        processed parts. Raises what the file system raises."""
        self.in_progress.save(force=final)
        self.processed.save(force=final)
        if final:
            consolidate(self.folder, self.topic, self.group)

    def try_save(self, final: bool = False) -> bool:
        """:meth:`save`, never raising: False if it failed. The first failure of a streak
        is logged as an error, the first success after it as a warning (a disk that
        stays full is not reported every second); :attr:`save_error` holds the reason."""
        try:
            self.save(final=final)
        except Exception as exc:  # noqa: BLE001 - OSError, or a registry format error
            self.save_error = f"{type(exc).__name__}: {exc}"
            self._failed_saves += 1
            if self._failed_saves == 1:
                logger.error("could not save the registries in %s (%s): uploads go on, "
                             "offset commits wait until a save works again",
                             self.folder, self.save_error)
            return False
        if self._failed_saves:
            logger.warning("the registries are saved again after %d failed attempt(s): "
                           "offset commits resume", self._failed_saves)
        self.save_error, self._failed_saves = None, 0
        return True


class RegistrySaver:
    """Runner side job: save the registries every ``interval`` seconds and at the end
    (failures are logged by :meth:`RegistryRecorder.try_save` and retried next time)."""

    def __init__(self, recorder: RegistryRecorder, interval: float) -> None:
        self.recorder = recorder
        self.interval = interval
        self._last = time.monotonic()

    def tick(self, runner: Any, final: bool = False) -> None:
        if final or time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.recorder.try_save(final=final)
