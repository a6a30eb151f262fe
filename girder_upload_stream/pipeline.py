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

from girder_upload_stream.codec import Chunk, FileKey, decode_chunk
from girder_upload_stream.errors import ChunkDecodeError, StorageError
from girder_upload_stream.offsets import OffsetTracker
from girder_upload_stream.reassembly import AddStatus, CompletedFile, Reassembler, RejectedFile
from girder_upload_stream.units import FileOutcome, Outcome, UploadUnit, group_into_units

__all__ = ["RawMessage", "Recorder", "Counters", "StreamProcessor", "file_generation"]

logger = logging.getLogger(__name__)


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


class Recorder:
    """Where file fates are written down (the registries); this base records nothing."""

    def chunk_added(self, chunk: Chunk, n_received: int) -> None: ...
    def message_rejected(self, msg: RawMessage, error: ChunkDecodeError) -> None: ...
    def file_rejected(self, rejected: RejectedFile) -> None: ...
    def file_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None: ...


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
    messages_rejected: int = 0
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
                 max_unit_bytes: int = 64 << 20, retry_delay: float = 15.0,
                 known_done: set[tuple[str, str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reassembler = reassembler
        # (rel_path, generation) of files the registries list as processed: their chunks,
        # re-read after a restart, are done at once (offsets rule 3) instead of starting a
        # partial file whose other chunks were committed past and will never come back.
        self.known_done = known_done or set()
        self.download_regex = download_regex
        self.recorder = recorder or Recorder()
        self.offsets = OffsetTracker()
        self.counters = Counters()
        self.max_unit_files, self.max_unit_bytes = max_unit_files, max_unit_bytes
        self.retry_delay, self._clock = retry_delay, clock
        self._ready: list[CompletedFile] = []
        self._retry: list[tuple[float, CompletedFile]] = []
        self._inflight: dict[int, UploadUnit] = {}
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
        try:
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

    def _add(self, chunk: Chunk, tp: tuple[str, int], offset: int, size: int) -> None:
        key = chunk.file_key
        if (chunk.rel_path, file_generation(chunk.file_hash)) in self.known_done \
                and not self._busy(key):
            self.offsets.read(tp, offset)
            return
        try:
            result = self.reassembler.add(chunk)
        except StorageError as error:
            # Not the file's fault: keep the message pending so a restart reads it again.
            logger.error("%s", error)
            self.offsets.read(tp, offset, key)
            return
        status = result.status
        if status is AddStatus.DUPLICATE and not self._busy(key):
            self.offsets.read(tp, offset)
            return
        if status is AddStatus.IGNORED:
            self.offsets.read(tp, offset)
            return
        self.offsets.read(tp, offset, key)
        # A duplicate (re-read after a rebalance) keeps the file busy but is not counted
        # again: bytes_processed covers the same messages as messages_processed.
        self._message_bytes[key] = (self._message_bytes.get(key, 0)
                                    + (0 if status is AddStatus.DUPLICATE else size))
        if status is AddStatus.ACCEPTED:
            self.recorder.chunk_added(chunk, 0)
        elif status is AddStatus.COMPLETED:
            self._ready.append(result.completed)
        elif status is AddStatus.REJECTED:
            logger.error("%s", result.rejected.to_error())
            self.counters.files_failed += 1
            self.recorder.file_rejected(result.rejected)
            self._settle(key)

    def _busy(self, key: FileKey) -> bool:
        """True while a file's fate is not durable yet (assembling, queued, uploading or
        waiting to retry). ``_message_bytes`` holds a key from its first message until
        it is settled; the offset tracker alone is not enough, as it forgets revoked
        partitions while their files are still here and their messages come again."""
        return key in self._message_bytes or self.offsets.has_file(key)

    def _settle(self, key: FileKey) -> None:
        self.offsets.file_done(key)
        self._message_bytes.pop(key, None)

    # -- uploading -------------------------------------------------------------------
    def take_units(self) -> list[UploadUnit]:
        """Completed files (and transient failures whose delay passed) as upload units."""
        now = self._clock()
        due = [f for t, f in self._retry if t <= now]
        self._retry = [(t, f) for t, f in self._retry if t > now]
        files, self._ready = due + self._ready, []
        units = group_into_units(files, self._next_unit, self.max_unit_files,
                                 self.max_unit_bytes)
        self._next_unit += len(units)
        for unit in units:
            self._inflight[unit.unit_id] = unit
        return units

    def finish_unit(self, unit: UploadUnit, outcomes: list[FileOutcome]) -> None:
        """Settle each file of a unit from its outcome; a missing outcome is transient."""
        self._inflight.pop(unit.unit_id, None)
        by_key = {o.file_key: o for o in outcomes}
        for completed in unit.files:
            key = (completed.rel_path, completed.file_hash)
            outcome = by_key.get(key) or FileOutcome(
                completed.rel_path, key, Outcome.FAILED_TRANSIENT, "no outcome reported")
            self._record(completed, key, outcome)

    def fail_unit(self, unit: UploadUnit, reason: str) -> None:
        """A whole unit failed (its task crashed or ran out of retries): retry it later."""
        self.finish_unit(unit, [FileOutcome(f.rel_path, (f.rel_path, f.file_hash),
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
        self._settle(key)

    # -- state ---------------------------------------------------------------------
    @property
    def inflight_units(self) -> int:
        return len(self._inflight)

    @property
    def bytes_held(self) -> int:
        """Bytes in RAM for files assembling, waiting, uploading or waiting to retry."""
        waiting = self._ready + [f for _, f in self._retry]
        waiting += [f for u in self._inflight.values() for f in u.files]
        return self.reassembler.bytes_held + sum(f.size for f in waiting if f.data is not None)

    @property
    def idle(self) -> bool:
        """Nothing waiting, uploading or waiting to retry. Files still assembling do not
        count: without new messages they cannot progress."""
        return not (self._ready or self._retry or self._inflight)
