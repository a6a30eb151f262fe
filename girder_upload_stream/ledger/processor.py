"""The consumer's pure core: from raw Kafka messages to upload units and committable
offsets. No Prefect, Kafka or Girder import: the loop feeds it messages and upload
outcomes, and asks it what to upload, what to commit and whether to pause fetching.

Each file generation's life is one record of the :class:`~.ledger.FileLedger`; the
offsets of its messages follow the rule of :mod:`girder_upload_stream.ledger.offsets`. One
message's path: :meth:`StreamProcessor.handle` decodes it (:mod:`.codec`), asks the
ledger what it means (:meth:`~.ledger.FileLedger.route`), hands it to the
:class:`~.reassembly.Reassembler`, and records it pending or done in the
:class:`~.offsets.OffsetTracker`; a completed file becomes ``READY`` in the ledger,
then travels in an upload unit, and its outcome settles it (:meth:`settle`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable

from girder_upload_stream import failpoints
from girder_upload_stream.assembly.lazy_checks import CHUNK_HASH_MISMATCH
from girder_upload_stream.assembly.reassembly import AddResult, AddStatus, Reassembler
from girder_upload_stream.errors import ChunkDecodeError, StorageError
from girder_upload_stream.ledger.effects import (AbandonStream, DropAssembly, Effect,
                                                 FinishAssembly, ReleaseOffsets,
                                                 ReleaseStaging, WriteRow)
from girder_upload_stream.ledger.file_life import STUCK_LOOKUP_SECONDS, FileLife
from girder_upload_stream.ledger.offsets import OffsetTracker
from girder_upload_stream.ledger.records import FileLedger, FileRecord, FileState, Role, Route
from girder_upload_stream.shared_types import (FileOutcome, Outcome, RawMessage, Recorder,
                                               StreamPlan)
from girder_upload_stream.ledger.stream_types import ChunkLiedError, ChunkRefusedError, Counters
from girder_upload_stream.ledger.streams import MAX_OPEN_STREAMS, StreamHandle, wants_stream
from girder_upload_stream.ledger.units import UploadUnit
from girder_upload_stream.ledger.uploading import Uploading
from girder_upload_stream.retry_policy import RetryPolicy
from girder_upload_stream.wire.codec import Chunk, FileKey, decode_chunk

# Its counters and refusal error are re-exported: callers of the processor need them (the
# data types it exchanges with other layers are in girder_upload_stream.shared_types).
__all__ = ["Counters", "StreamProcessor", "STUCK_LOOKUP_SECONDS", "ChunkRefusedError"]

logger = logging.getLogger(__name__)

#: Over the memory budget, files being rebuilt are spilled to disk down to this share of
#: it, so that spilling is not redone at every chunk.
SPILL_LOW_WATER = 0.75
#: Bytes of messages one poll may take at most (the batch is held until handled).
POLL_TARGET_BYTES = 32 << 20


class StreamProcessor(FileLife, Uploading):
    """Decode, filter and reassemble messages; batch completed files into upload units;
    settle files when uploads report back; retry transient failures later."""

    def __init__(self, reassembler: Reassembler, *, download_regex: re.Pattern[str] | None = None,
                 recorder: Recorder | None = None, max_unit_files: int = 64,
                 max_unit_bytes: int = 16 << 20, retry_delay: float = 15.0,
                 retry_policy: RetryPolicy | None = None,
                 known_done: set[tuple[str, str]] | None = None,
                 known_pending: set[tuple[str, str]] | None = None,
                 known_in_girder: set[tuple[str, str]] | None = None,
                 stale_partial_seconds: float | None = 3600.0,
                 max_inflight_units: int | None = None,
                 linger_seconds: float = 0.0,
                 memory_budget_bytes: int | None = None,
                 poll_target_bytes: int = POLL_TARGET_BYTES,
                 open_stream: Callable[[StreamPlan], StreamHandle] | None = None,
                 stream_min_bytes: int | None = None,
                 max_files_in_progress: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.reassembler = reassembler
        if max_files_in_progress is not None:
            reassembler.max_files_in_progress = max_files_in_progress
        self.ledger = FileLedger(known_done, known_pending, known_in_girder=known_in_girder)
        self.download_regex = download_regex
        self.recorder = recorder or Recorder()
        self.offsets = OffsetTracker(admits=self._could_take)
        self.counters = Counters()
        self.stale_partial_seconds = stale_partial_seconds
        self.max_inflight_units = max_inflight_units  # None: every ready file at once
        #: How long ready files may wait for more to share their upload unit (see
        #: :meth:`take_units`); 0: none.
        self.linger_seconds = linger_seconds
        self._ready_since: float | None = None  # when the oldest waiting file became ready
        self.memory_budget_bytes = memory_budget_bytes  # None: unbounded (no spilling)
        self.poll_target_bytes = poll_target_bytes  # one poll batch's bytes, about
        # Streamed uploads of big files (None: every file is uploaded at completion).
        self.open_stream, self.stream_min_bytes = open_stream, stream_min_bytes
        self.stream_shared: Callable[[], bool] = lambda: False  # set by the loop
        self.max_unit_files, self.max_unit_bytes = max_unit_files, max_unit_bytes
        self.retry_delay, self._clock, self._wall_clock = retry_delay, clock, wall_clock
        #: When a file whose upload failed transiently is tried again (``retry_delay``:
        #: an unanswered Girder lookup; also every file retry when no policy is given).
        self.retry_policy = retry_policy or RetryPolicy.constant(retry_delay)
        self._last_stale_check = wall_clock()
        self._units: dict[int, UploadUnit] = {}
        self._next_unit = 1
        self.last_settled_at: float | None = None  # clock time of the last durable file

    @property
    def known_done(self) -> set[tuple[str, str]]:
        """``(rel_path, generation)`` of every file processed (registries and this run)."""
        return self.ledger.known_done

    # -- reading --------------------------------------------------------------------
    def handle(self, msg: RawMessage) -> None:
        """Take one message; never raises for bad input (it is recorded instead)."""
        tp = (msg.topic, msg.partition)
        size = len(msg.value or b"")
        self.counters.messages_read += 1
        self.counters.bytes_read += size
        if self.offsets.replayed(tp, msg.offset):
            # Read again on the way back to a chunk put off at the bound (rule 10).
            self.counters.messages_skipped += 1
            return
        if self.offsets.skippable(tp, msg.offset):
            # Fetched before the seek over its gap took effect: done at the last commit.
            self.counters.messages_skipped += 1
            self.offsets.read(tp, msg.offset)
            return
        if self.offsets.before_back_seek(tp, msg.offset):
            # Fetched before the seek back to a failed file (rule 9): read again after it.
            self.counters.messages_skipped += 1
            return
        chunk = self._decode(msg, tp)
        if chunk is None:
            return
        if self.download_regex is not None and not self.download_regex.match(chunk.rel_path):
            self.offsets.read(tp, msg.offset)
            if chunk.chunk_i == 1:  # one count per file (its first chunk), not per message
                self.counters.files_skipped_by_regex += 1
            return
        self._take(chunk, msg, size)
        self.settle_liars()
        self._keep_within_budget()

    def _keep_within_budget(self) -> None:
        """Over the memory budget, move the largest files being rebuilt from RAM to
        their staging files (:meth:`Reassembler.spill`), down to ``SPILL_LOW_WATER`` of
        the budget less what completed files hold. Spilling loses nothing and never
        waits for anything, so it cannot deadlock; completed files over the budget are
        the loop's to handle (it pauses fetching until uploads free them). Bytes that
        open streams send and let go of without another message (:meth:`_draining`)
        are not spilled: the loop pauses while they leave instead of writing them."""
        budget = self.memory_budget_bytes
        held = self.reassembler.bytes_held + self.ledger.held_bytes
        if budget is None or held <= budget:
            return
        draining, keys = self._draining()
        if held - draining <= budget:
            return
        target = max(0, int(budget * SPILL_LOW_WATER) - self.ledger.held_bytes + draining)
        spilled = self.reassembler.spill(target, keys)
        if spilled:
            logger.debug("over the memory budget: %d file(s) being rebuilt spilled to disk",
                         spilled)

    def poll_size(self, most: int) -> int:
        """How many messages the next poll may take: ``most``, fewer when messages are
        large, so that one batch (held until handled) stays near ``poll_target_bytes``
        (the memory plan's share, memory_plan.py) and an eighth of the files' budget."""
        if not self.counters.messages_read:
            return most
        target = self.poll_target_bytes
        if self.memory_budget_bytes is not None:
            target = min(target, self.memory_budget_bytes // 8)
        average = self.counters.bytes_read / self.counters.messages_read
        return max(1, min(most, int(target // max(average, 1.0))))

    def _decode(self, msg: RawMessage, tp: tuple[str, int]) -> Chunk | None:
        topic, partition, offset = msg.source  # the source topic's, when re-keyed
        try:
            if msg.key is None:
                raise ChunkDecodeError("message has no key (OpenMSIStream keys every chunk)",
                                       topic=topic, partition=partition, offset=offset)
            return decode_chunk(msg.value, msg.key, topic=topic, partition=partition,
                                offset=offset, check_hash=not self.reassembler.lazy_checks)
        except ChunkDecodeError as error:
            self._reject_message(msg, error)
            return None

    def _reject_message(self, msg: RawMessage, error: ChunkDecodeError) -> None:
        """The one path of a message rejected on its own (undecodable, or a chunk refused
        by the reassembler): logged, recorded, and done (offsets rule 3)."""
        logger.error("%s", error)
        self.counters.messages_rejected += 1
        self.recorder.message_rejected(msg, error)
        self.offsets.read((msg.topic, msg.partition), msg.offset)

    def _take(self, chunk: Chunk, msg: RawMessage, size: int) -> None:
        """Route one chunk (the ledger says what it means), then reassemble it."""
        key, tp, offset = chunk.file_key, (msg.topic, msg.partition), msg.offset
        reread = self.offsets.is_reread(tp, offset)
        busy = self.ledger.busy(key)
        if not busy and self.offsets.is_put_off(tp, offset) and self.ledger.is_known_done(key):
            # Put off at the bound, its file settled since from its other copies: read in
            # its turn, it was a duplicate, not a new production (offsets rule 10).
            self.offsets.read(tp, offset)
            return
        route = self.ledger.route(key, reread)
        if route in (Route.DONE_BEFORE, Route.COUNT_REPEAT):
            self.offsets.read(tp, offset)
            if route is Route.COUNT_REPEAT:
                self.ledger.count_repeat(key, chunk.n_total_chunks, chunk.chunk_i, None)
                self._register_repeats(key)
            return
        # A new production of a file settled in this run is rebuilt from scratch, not
        # taken for a duplicate of the first copy; so is a file whose upload failed for
        # good in this run, when its messages come again (rule 9's seek back after its
        # partition was revoked and assigned again).
        fresh = (route is Route.ASSEMBLE_AGAIN or self.ledger.failed_for_good(key)
                 or (not busy and not reread))
        result = self._reassemble(chunk, fresh, msg)
        if result is None:
            return
        if result.status is AddStatus.REFUSED:
            if result.full:
                self._put_off(msg, chunk)
            else:
                self._refused(msg, chunk, result)
            return
        rejected_before = result.status is AddStatus.IGNORED or result.of_rejected
        if rejected_before or (result.status is AddStatus.DUPLICATE and not busy):
            # A chunk of a file rejected before (a dead letter: it is committed past and
            # in no file in Girder), or a late duplicate of one settled.
            self.offsets.read(tp, offset)
            if rejected_before:
                self.recorder.chunk_rejected(msg, result.reason or "file rejected",
                                             file=chunk.rel_path)
            return
        record = self.ledger.open(key, Role.AGAIN if route is Route.ASSEMBLE_AGAIN
                                  else Role.FIRST)
        if not reread and record.role is Role.FIRST:
            self.ledger.count_copy(record, chunk.n_total_chunks, chunk.chunk_i, result.status)
        # Girder is asked at once about a file whose first chunk here is a re-read, or
        # of a path another program processed: its other chunks may be committed past
        # (by that program), and waiting for the stuck-file lookup would hold this one.
        look_up = not busy and (reread or self.ledger.listed_by_another_program(key))
        self._apply(record, result, chunk, tp, offset, size, look_up)

    def _reassemble(self, chunk: Chunk, fresh: bool, msg: RawMessage) -> AddResult | None:
        """The chunk into the reassembler (``fresh``: forget what it completed of this
        generation before); None when local storage failed (the message then stays
        pending, so a restart reads it again: not the file's fault). The chunk's tag is
        its message without bytes: what names it if it is found lying later."""
        key, tp, offset = chunk.file_key, (msg.topic, msg.partition), msg.offset
        if fresh and self.reassembler.is_completed(key):
            self.reassembler.discard(key)  # rebuilt from scratch, not a duplicate
        tag = RawMessage(msg.topic, msg.partition, msg.offset, msg.key, None, msg.origin)
        try:
            result = self.reassembler.add(chunk, tag)
            if result.full and self._evict_released():
                result = self.reassembler.add(chunk, tag)
            return result
        except StorageError as error:
            logger.error("%s", error)
            self.offsets.read(tp, offset, self.ledger.open(key).pending)
            return None

    def settle_liars(self) -> None:
        """Chunks stored unchecked and found lying since (lazy checks,
        assembly/lazy_checks.py): each message is rejected on its own, as one refused on
        arrival is (offsets rule 3), and a file left with no chunk is dropped."""
        liars = self.reassembler.take_liars()
        for liar in liars:
            msg = liar.tag
            if isinstance(msg, RawMessage):
                topic, partition, offset = msg.source
                error = ChunkLiedError(CHUNK_HASH_MISMATCH, topic=topic, partition=partition,
                                       offset=offset, rel_path=liar.rel_path)
                logger.error("%s", error)
                self.counters.messages_rejected += 1
                self.recorder.message_rejected(msg, error)
                self.offsets.message_done((msg.topic, msg.partition), msg.offset)
        for key in {liar.file_key for liar in liars}:
            record = self.ledger.get(key)
            if record is not None and record.state in (FileState.ASSEMBLING,
                                                       FileState.STREAMING) \
                    and self.reassembler.assembly(key) is None:
                self._carry_out(self.ledger.drop(key))

    def _refused(self, msg: RawMessage, chunk: Chunk, result: AddResult) -> None:
        """A chunk the reassembler cannot use (impossible for its file, over a bound):
        the message alone is rejected; its file, if any, goes on without it."""
        if result.contested:
            self._contested(result.file_key)
        topic, partition, offset = msg.source
        self._reject_message(msg, ChunkRefusedError(
            result.reason, topic=topic, partition=partition, offset=offset,
            rel_path=chunk.rel_path))

    def _contested(self, key: FileKey) -> None:
        """Competing copies of a file are held: its in-order prefix is no longer known
        to be its bytes, so an open streamed upload is abandoned (it is uploaded whole
        once a copy verifies) and none is opened again."""
        effects = self.ledger.abandon_stream(key, for_good=True)
        if effects:
            logger.info("%s: competing copies received; its streamed upload is abandoned "
                        "and the file is uploaded once a copy verifies", key[0])
        self._carry_out(effects)

    def _apply(self, record: FileRecord, result: AddResult, chunk: Chunk,
               tp: tuple[str, int], offset: int, size: int, look_up: bool) -> None:
        """What the reassembler did decides the message's offset and the record's state."""
        key, status = record.key, result.status
        self.offsets.read(tp, offset, record.pending if record.holds_commit else None)
        if record.assembly is None and status is AddStatus.ACCEPTED:
            record.assembly = self.reassembler.assembly(key)  # the record holds it
        # A duplicate (re-read after a rebalance) keeps the file busy but is not counted
        # again: bytes_processed covers the same messages as messages_processed.
        record.message_bytes += 0 if status is AddStatus.DUPLICATE else size
        if result.contested and status is not AddStatus.COMPLETED:
            self._contested(key)
        if result.reason and status is AddStatus.ACCEPTED:  # one chunking failed its sha512
            logger.warning("%s: %s", key[0], result.reason)
        if status is AddStatus.ACCEPTED:
            if record.role is Role.FIRST:  # a file produced again is not "in progress"
                self.recorder.chunk_added(chunk, tp[1], offset)
            if look_up and not self.ledger.is_known_pending(key):
                self.ledger.want_lookup(key, self._clock())
            self._stream(record, chunk)
            failpoints.hit("chunk.added")
        elif status is AddStatus.COMPLETED:
            if result.contested:
                self._contested(key)
            self.ledger.complete(key, result.completed)
        elif status is AddStatus.REJECTED:
            # To the dead-letter topic too when the next run retries it: the operator
            # sees every copy that failed (the reason says it is read again).
            rejected, effects = self.ledger.reject(key, result.rejected, (tp, offset))
            logger.error("%s", rejected.to_error())
            self.counters.files_failed += 1
            self._carry_out(effects)

    def _stream(self, record: FileRecord, chunk: Chunk) -> None:
        """Open a streamed upload for a big file once its size is known, or tell the
        open one that its prefix may have grown (never waits: the upload has its own
        thread)."""
        if record.state is FileState.STREAMING:
            record.stream.nudge()
            return
        if self.open_stream is None or record.state is not FileState.ASSEMBLING \
                or record.stream_tried \
                or self.ledger.count(FileState.STREAMING) >= MAX_OPEN_STREAMS:
            return
        key, reassembler = record.key, self.reassembler
        view = reassembler.stream_view(key)
        if view is None or not wants_stream(chunk.n_total_chunks, chunk.size, view[0],
                                            self.stream_min_bytes, record.holds_commit
                                            and record.role is Role.FIRST, *view[1:]):
            return
        plan = StreamPlan(key[0], key[1], view[0], lambda: reassembler.stream_view(key),
                          lambda start, end: reassembler.read_prefix(key, start, end),
                          self.stream_shared, lambda end: reassembler.let_go(key, end))
        self.ledger.stream(key, self.open_stream(plan))

    def abandon_streams(self, reason: str) -> int:
        """Give up every streamed upload still assembling (partitions revoked or lost:
        another consumer may rebuild the file): each file goes on assembling and is
        uploaded whole if it completes here. Returns how many."""
        streaming = self.ledger.in_state(FileState.STREAMING)
        for record in streaming:
            self._carry_out(self.ledger.abandon_stream(record.key))
        if streaming:
            logger.info("%d streamed upload(s) abandoned: %s", len(streaming), reason)
        return len(streaming)

    def close_streams(self, timeout: float) -> None:
        """At shutdown: abandon the streamed uploads not being finished (bounded)."""
        for state in (FileState.STREAMING, FileState.READY, FileState.WAITING_TO_RETRY):
            for record in self.ledger.in_state(state):
                if record.stream is not None:
                    record.stream.close(timeout)

    def _register_repeats(self, key: FileKey) -> None:
        """Register each copy produced again of a settled file (Girder would skip it)."""
        for first in self.ledger.repeats_due(key):
            self.recorder.file_outcome(first, FileOutcome(
                first.rel_path, key, Outcome.SKIPPED_IDENTICAL, "produced again"))
            self.counters.files_skipped += 1

    def _carry_out(self, effects: Iterable[Effect]) -> None:
        """The one place where a file's transitions (ledger/transitions.py) act on the
        reassembler, the offsets, the stream sessions and the registries, in order."""
        for effect in effects:
            match effect:
                case AbandonStream(handle):
                    handle.abandon()
                case DropAssembly(key):
                    self.reassembler.discard(key)
                case FinishAssembly(key):
                    self.reassembler.mark_finished(key)
                case ReleaseStaging(completed):
                    self.reassembler.release(completed)
                case ReleaseOffsets(pending, retry):
                    self.offsets.file_done(pending, retry=retry)
                case WriteRow(call, args):
                    getattr(self.recorder, call)(*args)

    # -- state ---------------------------------------------------------------------
    @property
    def inflight_units(self) -> int:
        return len(self._units)

    @property
    def bytes_held(self) -> int:
        """Bytes in RAM for files assembling, waiting, uploading or waiting to retry."""
        return self.reassembler.bytes_held + self.ledger.held_bytes

    @property
    def idle(self) -> bool:
        """Nothing waiting, uploading or waiting to retry, and no stream sending bytes
        it holds. Files still assembling do not count otherwise: without new messages
        they cannot progress."""
        return not (self._units or self.ledger.count(
            FileState.READY, FileState.UPLOADING, FileState.WAITING_TO_RETRY)
            or self._draining()[0])

    def _draining(self) -> tuple[int, frozenset]:
        """RAM bytes the open streams send to Girder and let go of without another
        message, and their files' keys."""
        total, keys = 0, set()
        for record in self.ledger.in_state(FileState.STREAMING):
            drains_to = getattr(record.stream, "drains_to", None)
            end = drains_to() if drains_to is not None else 0
            held = self.reassembler.ram_below(record.key, end) if end else 0
            if held:
                total += held
                keys.add(record.key)
        return total, frozenset(keys)
