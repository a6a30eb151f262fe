"""The consumer's pure core: from raw Kafka messages to upload units and committable
offsets. No Prefect, Kafka or Girder import: the flow feeds it messages and upload
outcomes, and asks it what to upload, what to commit and whether to pause fetching.

Offsets follow the rule written down in :mod:`girder_upload_stream.offsets`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from girder_upload_stream import failpoints
from girder_upload_stream.codec import Chunk, FileKey, decode_chunk
from girder_upload_stream.copies import CopyTracker
from girder_upload_stream.errors import ChunkDecodeError, StorageError
from girder_upload_stream.offsets import OffsetTracker
from girder_upload_stream.reassembly import (AddStatus, CompletedFile, FileProgress,
                                             Reassembler, RejectedFile)
from girder_upload_stream.units import (FileOutcome, Outcome, UploadUnit, group_into_units,
                                        stripe_into_units)

__all__ = ["RawMessage", "PartitionInfo", "Recorder", "Counters", "StreamProcessor",
           "file_generation"]

logger = logging.getLogger(__name__)

#: A partial file quiet for this long (or half of stale_partial_seconds) is looked up in
#: Girder once: its chunks may have been finished before a crash (offsets rule 7).
STUCK_LOOKUP_SECONDS = 30.0


def file_generation(file_hash: bytes) -> str:
    """The short id of one generation of a file (its sha512 prefix), as registries keep it."""
    return file_hash.hex()[:32]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as read from Kafka (value may be None for tombstones)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """A partition just assigned: its committed offset and commit metadata (None when
    unknown or never committed) and the oldest offset still in the topic."""

    topic: str
    partition: int
    committed: int | None
    metadata: str | None
    low: int | None


class Recorder:
    """Where file fates are written down (the registries); this base records nothing."""

    def chunk_added(self, chunk: Chunk, partition: int, offset: int) -> None: ...
    def message_rejected(self, msg: RawMessage, error: ChunkDecodeError) -> None: ...
    def file_rejected(self, rejected: RejectedFile) -> None: ...
    def file_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None: ...
    def file_found(self, progress: FileProgress) -> None: ...
    def file_stale(self, progress: FileProgress, reason: str) -> None: ...
    def file_dropped(self, progress: FileProgress) -> None: ...
    def messages_gone(self, partition: int, first: int, end: int) -> None: ...


@dataclass
class Counters:
    """Totals since start, and since the last heartbeat (``take_delta``)."""

    messages_read: int = 0
    bytes_read: int = 0
    messages_processed: int = 0
    bytes_processed: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_found_in_girder: int = 0
    messages_rejected: int = 0
    messages_skipped: int = 0  # read, but done before a restart (offsets rule 8)
    _last: dict[str, int] = field(default_factory=dict, repr=False)

    def take_delta(self) -> dict[str, int]:
        now = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        return delta


class StreamProcessor:
    """Decode, filter and reassemble messages; batch completed files into upload units;
    settle their offsets when uploads report back; retry transient failures later."""

    def __init__(self, reassembler: Reassembler, *, download_regex: re.Pattern[str] | None = None,
                 recorder: Recorder | None = None, max_unit_files: int = 64,
                 max_unit_bytes: int = 16 << 20, retry_delay: float = 15.0,
                 known_done: set[tuple[str, str]] | None = None,
                 known_pending: set[tuple[str, str]] | None = None,
                 stale_partial_seconds: float | None = 3600.0,
                 max_inflight_units: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.reassembler = reassembler
        # (rel_path, generation) of files the registries list as processed: their chunks,
        # re-read after a restart, are done at once (offsets rule 3) instead of starting a
        # partial file whose other chunks were committed past and will never come back.
        self.known_done = known_done or set()
        # ... and of files the in-progress registry lists: re-read, they need no lookup
        # in Girder (they were pending, so all their chunks are re-read).
        self.known_pending = known_pending or set()
        self.stale_partial_seconds = stale_partial_seconds
        self.max_inflight_units = max_inflight_units  # None: every ready file at once
        self._wall_clock = wall_clock
        self._last_stale_check = wall_clock()
        self._echo: set[FileKey] = set()      # second productions: rebuilt, never held
        self._stale: set[FileKey] = set()     # partials whose messages were released
        self._probes: dict[FileKey, float] = {}  # Girder lookups not handed out, by due time
        self._probed: set[FileKey] = set()  # wanted once already (until the file settles)
        self.copies = CopyTracker()  # copies produced again while the first uploads
        self.download_regex = download_regex
        self.recorder = recorder or Recorder()
        self.offsets = OffsetTracker()
        self.counters = Counters()
        self.max_unit_files, self.max_unit_bytes = max_unit_files, max_unit_bytes
        self.retry_delay, self._clock = retry_delay, clock
        self._ready: list[CompletedFile] = []
        self._retry: list[tuple[float, CompletedFile]] = []
        self._inflight: dict[int, UploadUnit] = {}
        self._early_done: set[tuple[int, FileKey]] = set()  # settled before their unit
        self._next_unit = 1
        self._message_bytes: dict[FileKey, int] = {}
        self.last_settled_at: float | None = None  # clock time of the last durable file

    # -- reading --------------------------------------------------------------------
    def handle(self, msg: RawMessage) -> None:
        """Take one message; never raises for bad input (it is recorded instead)."""
        tp = (msg.topic, msg.partition)
        size = len(msg.value or b"")
        self.counters.messages_read += 1
        self.counters.bytes_read += size
        if self.offsets.skippable(tp, msg.offset):
            # Fetched before the seek over its gap took effect: done at the last commit.
            self.counters.messages_skipped += 1
            self.offsets.read(tp, msg.offset)
            return
        try:
            if msg.key is None:
                raise ChunkDecodeError("message has no key (OpenMSIStream keys every chunk)",
                                       topic=msg.topic, partition=msg.partition,
                                       offset=msg.offset)
            chunk = decode_chunk(msg.value, msg.key, topic=msg.topic,
                                 partition=msg.partition, offset=msg.offset)
        except ChunkDecodeError as error:
            logger.error("%s", error)
            self.counters.messages_rejected += 1
            self.recorder.message_rejected(msg, error)
            self.offsets.read(tp, msg.offset)
            return
        if self.download_regex is not None and not self.download_regex.match(chunk.rel_path):
            self.offsets.read(tp, msg.offset)
            return
        self._add(chunk, tp, msg.offset, size)

    def assigned(self, partitions: list[PartitionInfo]) -> None:
        """Partitions gained: learn their re-read span (offsets rule 7) and say when
        messages a restart needs are gone from the topic (retention deleted them)."""
        for info in partitions:
            tp = (info.topic, info.partition)
            self.offsets.assigned(tp, info.committed, info.metadata)
            spans = self.offsets.reread_spans(tp)
            if spans is not None and self.offsets.is_reread(tp, info.committed or 0):
                logger.info("%s[%d]: a restart reads %d of the %d message(s) of offsets "
                            "%d to %d again (%d span(s)); the rest was done", *tp,
                            sum(b - a for a, b in spans),
                            self.offsets.high_watermark(tp) - (info.committed or 0),
                            info.committed or 0, self.offsets.high_watermark(tp) - 1,
                            len(spans))
            if info.committed is not None and info.low is not None and info.low > info.committed:
                logger.error("%s[%d]: offsets %d to %d are gone from the topic (retention) "
                             "although this group never finished them; files with chunks "
                             "there cannot be rebuilt", info.topic, info.partition,
                             info.committed, info.low - 1)
                self.recorder.messages_gone(info.partition, info.committed, info.low)

    def _add(self, chunk: Chunk, tp: tuple[str, int], offset: int, size: int) -> None:
        key = chunk.file_key
        busy = self._busy(key)
        reread = self.offsets.is_reread(tp, offset)
        known = (chunk.rel_path, file_generation(chunk.file_hash))
        if not busy and reread and known in self.known_done:
            self.offsets.read(tp, offset)
            return
        if not busy and not reread and self.copies.tracking(key):
            self.offsets.read(tp, offset)  # a copy produced again, counted (not rebuilt)
            self.copies.add(key, chunk.chunk_i)
            self._register_copies(key)
            return
        if not busy and not reread and (known in self.known_done
                                        or self.reassembler.is_completed(key)):
            # Produced again (rule 7): rebuilt and recorded again, but never holding a
            # commit: Girder already has this content, and a stray duplicate chunk
            # must not wait for a file that will not come.
            self.reassembler.discard(key)
            self._echo.add(key)
        try:
            result = self.reassembler.add(chunk)
        except StorageError as error:
            # Not the file's fault: keep the message pending so a restart reads it again.
            logger.error("%s", error)
            self.offsets.read(tp, offset, key)
            return
        status = result.status
        if status is AddStatus.DUPLICATE and not busy:
            self.offsets.read(tp, offset)
            return
        if not reread and key not in self._echo:
            self._count_copy(key, chunk, status)
        if status is AddStatus.IGNORED:
            self.offsets.read(tp, offset)
            return
        self.offsets.read(tp, offset, None if key in self._echo else key)
        # A duplicate (re-read after a rebalance) keeps the file busy but is not counted
        # again: bytes_processed covers the same messages as messages_processed.
        self._message_bytes[key] = (self._message_bytes.get(key, 0)
                                    + (0 if status is AddStatus.DUPLICATE else size))
        if status is AddStatus.ACCEPTED:
            if key not in self._echo:  # a second production is not "in progress": it holds nothing
                self.recorder.chunk_added(chunk, tp[1], offset)
            if reread and not busy and known not in self.known_pending:
                self._want_probe(key)
            failpoints.hit("chunk.added")
        elif status is AddStatus.COMPLETED:
            self._ready.append(result.completed)
        elif status is AddStatus.REJECTED:
            logger.error("%s", result.rejected.to_error())
            self.counters.files_failed += 1
            self.recorder.file_rejected(result.rejected)
            self._settle(key)

    def _count_copy(self, key: FileKey, chunk: Chunk, status: AddStatus) -> None:
        """A new (not re-read) chunk of a busy file: a duplicate begins counting the
        copies produced again (see :mod:`girder_upload_stream.copies`)."""
        if status is AddStatus.DUPLICATE and not self.copies.tracking(key):
            received = self.reassembler.received(key)
            self.copies.start(key, chunk.n_total_chunks, received if received is not None
                              else range(1, chunk.n_total_chunks + 1))
        if status in (AddStatus.DUPLICATE, AddStatus.ACCEPTED, AddStatus.COMPLETED):
            self.copies.add(key, chunk.chunk_i)

    def _register_copies(self, key: FileKey) -> None:
        """Register each copy produced again of a settled file (Girder would skip it)."""
        for first in self.copies.take_due(key):
            self.recorder.file_outcome(first, FileOutcome(
                first.rel_path, key, Outcome.SKIPPED_IDENTICAL, "produced again"))
            self.counters.files_skipped += 1

    def _busy(self, key: FileKey) -> bool:
        """True while a file's fate is not durable yet (assembling, queued, uploading or
        waiting to retry). ``_message_bytes`` holds a key from its first message until
        it is settled; the offset tracker alone is not enough, as it forgets revoked
        partitions while their files are still here and their messages come again."""
        return key in self._message_bytes or self.offsets.has_file(key)

    def _settle(self, key: FileKey) -> None:
        self.offsets.file_done(key)
        self._message_bytes.pop(key, None)
        self._echo.discard(key)
        self._stale.discard(key)
        self._probes.pop(key, None)
        self._probed.discard(key)

    # -- restart knowledge from Girder ----------------------------------------------
    def _want_probe(self, key: FileKey) -> None:
        if key not in self._probed:
            self._probed.add(key)
            self._probes[key] = self._clock()

    def take_probes(self) -> list[FileKey]:
        """Re-read files unknown to the registries, to look up in Girder (rule 7)."""
        now = self._clock()
        due = [key for key, at in self._probes.items() if at <= now]
        for key in due:  # handed out: back in _probes only if Girder could not tell
            del self._probes[key]
        return due

    def probe_result(self, key: FileKey, found: bool | None) -> None:
        """Girder holds this generation (True), does not (False), or could not tell now
        (None: looked up again later). Found while still partial: done (rule 7)."""
        if found is None:
            if key in self._probed:  # not settled meanwhile: ask again later
                self._probes[key] = self._clock() + self.retry_delay
            return
        progress = self.reassembler.progress(key)
        if not found or progress is None:
            return  # not there, or completed meanwhile: the upload decides
        logger.info("%s was uploaded before (found in Girder by sha512): its re-read "
                    "chunks are done", key[0])
        self.reassembler.mark_finished(key)
        self.known_done.add((key[0], file_generation(key[1])))
        self.counters.files_found_in_girder += 1
        self.recorder.file_found(progress)
        self._settle(key)

    def expire_stale(self) -> None:
        """Release the commit hold of partial files that got no chunk for
        ``stale_partial_seconds`` (rule 4); forget stale second productions."""
        now = self._wall_clock()
        if self.stale_partial_seconds is None or now - self._last_stale_check < 1.0:
            return
        self._last_stale_check = now
        stuck_after = min(STUCK_LOOKUP_SECONDS, self.stale_partial_seconds / 2)
        for progress in self.reassembler.in_progress():
            quiet = now - progress.last_message_at
            key = (progress.rel_path, bytes.fromhex(progress.file_hash_hex))
            if quiet >= stuck_after and key not in self._echo:
                # Maybe its other chunks were committed past before a crash whose last
                # watermark was not committed yet: Girder may already hold it.
                self._want_probe(key)
            if quiet < self.stale_partial_seconds:
                continue
            if key in self._echo:
                self.reassembler.discard(key)
                self.recorder.file_dropped(progress)
                self._settle(key)
            elif key not in self._stale:
                self._stale.add(key)
                released = self.offsets.file_done(key)
                reason = (f"incomplete: {progress.n_received} of {progress.n_total} chunks, "
                          f"none for {self.stale_partial_seconds:g}s; its {released} "
                          f"message(s) were released and are not read again after a restart")
                logger.warning("%s: %s", progress.rel_path, reason)
                self.recorder.file_stale(progress, reason)

    def hand_over(self, tps: list[tuple[str, int]]) -> int:
        """Partitions are being revoked (their offsets just committed): drop the files
        waiting for upload or for a retry whose every pending message is on them. The
        next owner reads those messages again from the commit and uploads the files;
        uploading them here too would only race it to Girder. Files already uploading
        are left to finish. Returns how many files were handed over."""
        def leaves(completed: CompletedFile) -> bool:
            key = completed.file_key
            return key not in self._echo and self.offsets.only_in(key, tps)

        handed = [f for f in self._ready if leaves(f)] + [f for _, f in self._retry
                                                          if leaves(f)]
        gone = {f.file_key for f in handed}
        self._ready = [f for f in self._ready if f.file_key not in gone]
        self._retry = [(t, f) for t, f in self._retry if f.file_key not in gone]
        for completed in handed:
            key = completed.file_key
            self.reassembler.discard(key)  # so its chunks, if they come back, rebuild it
            self.reassembler.release(completed)
            self._message_bytes.pop(key, None)
            self.recorder.file_dropped(FileProgress(
                completed.rel_path, completed.file_hash_hex, completed.n_chunks,
                completed.n_chunks, completed.size, 0, completed.first_message_at,
                completed.last_message_at))
        if handed:
            logger.info("%d file(s) waiting for upload left to the next owner of %s",
                        len(handed), ", ".join(f"{t}[{p}]" for t, p in tps))
        return len(handed)

    # -- uploading -------------------------------------------------------------------
    def take_units(self) -> list[UploadUnit]:
        """Completed files (and transient failures whose delay passed) as upload units."""
        self.expire_stale()
        free = (None if self.max_inflight_units is None
                else self.max_inflight_units - len(self._inflight))
        if free is not None and free <= 0:
            return []  # every worker busy: sort and pack when one frees up, not each round
        now = self._clock()
        due = [f for t, f in self._retry if t <= now]
        self._retry = [(t, f) for t, f in self._retry if t > now]
        files, self._ready = due + self._ready, []
        # Oldest messages first: a partition's commit waits for its lowest pending
        # offset, so uploading in completion order (scrambled across partitions) would
        # hold every commit near the start while the reading runs far ahead.
        files.sort(key=lambda f: self.offsets.first_offset(f.file_key))
        if free is None:
            units = group_into_units(files, self._next_unit, self.max_unit_files,
                                     self.max_unit_bytes)
        else:
            # No more units than can run at once, striped: the rest wait here, so the
            # next unit takes the oldest files when a worker frees up.
            units, self._ready = (stripe_into_units(files, self._next_unit, free,
                                                    self.max_unit_files, self.max_unit_bytes)
                                  if files else ([], files))
        self._next_unit += len(units)
        for unit in units:
            self._inflight[unit.unit_id] = unit
        return units

    def settle_early(self, unit_id: int, outcome: FileOutcome) -> None:
        """A file of a unit still running has landed (or failed for good): settle it now,
        so its offsets need not wait for the rest of the unit. Transient outcomes wait
        for the unit's result (its retry decides)."""
        unit = self._inflight.get(unit_id)
        mark = (unit_id, outcome.file_key)
        if unit is None or not outcome.outcome.durable or mark in self._early_done:
            return
        for completed in unit.files:
            if completed.file_key == outcome.file_key:
                self._early_done.add(mark)
                self._record(completed, outcome.file_key, outcome)
                return

    def finish_unit(self, unit: UploadUnit, outcomes: list[FileOutcome]) -> None:
        """Settle each file of a unit from its outcome (files settled early are left
        alone); a missing outcome is transient."""
        self._inflight.pop(unit.unit_id, None)
        by_key = {o.file_key: o for o in outcomes}
        for completed in unit.files:
            key = completed.file_key
            if (unit.unit_id, key) in self._early_done:
                self._early_done.discard((unit.unit_id, key))
                continue
            outcome = by_key.get(key) or FileOutcome(
                completed.rel_path, key, Outcome.FAILED_TRANSIENT, "no outcome reported")
            self._record(completed, key, outcome)

    def fail_unit(self, unit: UploadUnit, reason: str) -> None:
        """A whole unit failed (its task crashed or ran out of retries): retry it later."""
        self.finish_unit(unit, [FileOutcome(f.rel_path, f.file_key,
                                            Outcome.FAILED_TRANSIENT, reason) for f in unit.files])

    def _record(self, completed: CompletedFile, key: FileKey, outcome: FileOutcome) -> None:
        self.recorder.file_outcome(completed, outcome)
        if not outcome.outcome.durable:
            logger.warning("upload of %s failed (%s); retrying in %.0fs",
                           completed.rel_path, outcome.reason, self.retry_delay)
            self._retry.append((self._clock() + self.retry_delay, completed))
            return
        if outcome.outcome is Outcome.FAILED_TERMINAL:
            logger.error("upload of %s failed for good: %s", completed.rel_path, outcome.reason)
            self.counters.files_failed += 1
        elif outcome.outcome in (Outcome.UPLOADED, Outcome.REPLACED):
            self.counters.files_uploaded += 1
        else:
            self.counters.files_skipped += 1
        self.last_settled_at = self._clock()
        self.known_done.add((completed.rel_path, file_generation(completed.file_hash)))
        self.counters.messages_processed += completed.n_chunks
        self.counters.bytes_processed += self._message_bytes.get(key, completed.size)
        if outcome.outcome is not Outcome.FAILED_TERMINAL:
            self.copies.settled(completed)
            self._register_copies(key)
        self.reassembler.release(completed)  # disk mode: its staging file is no longer needed
        self._settle(key)

    # -- state ---------------------------------------------------------------------
    @property
    def inflight_units(self) -> int:
        return len(self._inflight)

    @property
    def bytes_held(self) -> int:
        """Bytes in RAM for files assembling, waiting, uploading or waiting to retry."""
        waiting = self._ready + [f for _, f in self._retry]
        waiting += [f for u in self._inflight.values() for f in u.files
                    if (u.unit_id, f.file_key) not in self._early_done]
        return self.reassembler.bytes_held + sum(f.size for f in waiting if f.data is not None)

    @property
    def idle(self) -> bool:
        """Nothing waiting, uploading or waiting to retry. Files still assembling do not
        count: without new messages they cannot progress."""
        return not (self._ready or self._retry or self._inflight)
