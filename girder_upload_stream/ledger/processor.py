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
from collections.abc import Callable
from dataclasses import replace

from girder_upload_stream import failpoints
from girder_upload_stream.wire.codec import Chunk, FileKey, decode_chunk
from girder_upload_stream.errors import ChunkDecodeError, StorageError
from girder_upload_stream.ledger.records import (FileLedger, FileRecord, FileState, Role, Route,
                                         file_generation)
from girder_upload_stream.ledger.offsets import OffsetTracker
from girder_upload_stream.assembly.reassembly import (AddResult, AddStatus, CompletedFile,
                                             FileProgress, Reassembler)
from girder_upload_stream.ledger.stream_types import Counters, PartitionInfo, RawMessage, Recorder
from girder_upload_stream.ledger.streams import (MAX_OPEN_STREAMS, StreamHandle, StreamPlan,
                                                 wants_stream)
from girder_upload_stream.ledger.units import (FileOutcome, Outcome, UploadUnit, group_into_units,
                                        stripe_into_units)

# The exchanged types are re-exported: callers of the processor need them.
__all__ = ["RawMessage", "PartitionInfo", "Recorder", "Counters", "StreamProcessor",
           "RETRIED_NEXT_RUN", "file_generation"]

logger = logging.getLogger(__name__)

#: A partial file quiet for this long (or half of stale_partial_seconds) is looked up in
#: Girder once: its chunks may have been finished before a crash (offsets rule 7).
STUCK_LOOKUP_SECONDS = 30.0
#: What the registry says of a file whose upload failed for good (offsets rule 9).
RETRIED_NEXT_RUN = "its messages are read again by the next run of this consumer group"
#: Over the memory budget, files being rebuilt are spilled to disk down to this share of
#: it, so that spilling is not redone at every chunk.
SPILL_LOW_WATER = 0.75
#: Bytes of messages one poll may take at most (the batch is held until handled).
POLL_TARGET_BYTES = 32 << 20


def _progress_of(completed: CompletedFile) -> FileProgress:
    return FileProgress(completed.rel_path, completed.file_hash_hex, completed.n_chunks,
                        completed.n_chunks, completed.size, 0, completed.first_message_at,
                        completed.last_message_at)


class StreamProcessor:
    """Decode, filter and reassemble messages; batch completed files into upload units;
    settle files when uploads report back; retry transient failures later."""

    def __init__(self, reassembler: Reassembler, *, download_regex: re.Pattern[str] | None = None,
                 recorder: Recorder | None = None, max_unit_files: int = 64,
                 max_unit_bytes: int = 16 << 20, retry_delay: float = 15.0,
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
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.reassembler = reassembler
        self.ledger = FileLedger(known_done, known_pending, known_in_girder=known_in_girder)
        self.download_regex = download_regex
        self.recorder = recorder or Recorder()
        self._current: RawMessage | None = None  # the message being handled
        self.offsets = OffsetTracker()
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
            return
        self._current = msg  # the raw message, for the rejection sink
        self._take(chunk, tp, msg.offset, size)
        self._keep_within_budget()

    def _keep_within_budget(self) -> None:
        """Over the memory budget, move the largest files being rebuilt from RAM to
        their staging files (:meth:`Reassembler.spill`), down to ``SPILL_LOW_WATER`` of
        the budget less what completed files hold. Spilling loses nothing and never
        waits for anything, so it cannot deadlock; completed files over the budget are
        the loop's to handle (it pauses fetching until uploads free them)."""
        budget = self.memory_budget_bytes
        if budget is None or self.reassembler.bytes_held + self.ledger.held_bytes <= budget:
            return
        target = max(0, int(budget * SPILL_LOW_WATER) - self.ledger.held_bytes)
        spilled = self.reassembler.spill(target)
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
        try:
            if msg.key is None:
                raise ChunkDecodeError("message has no key (OpenMSIStream keys every chunk)",
                                       topic=msg.topic, partition=msg.partition,
                                       offset=msg.offset)
            return decode_chunk(msg.value, msg.key, topic=msg.topic,
                                partition=msg.partition, offset=msg.offset)
        except ChunkDecodeError as error:
            logger.error("%s", error)
            self.counters.messages_rejected += 1
            self.recorder.message_rejected(msg, error)
            self.offsets.read(tp, msg.offset)
            return None

    def _take(self, chunk: Chunk, tp: tuple[str, int], offset: int, size: int) -> None:
        """Route one chunk (the ledger says what it means), then reassemble it."""
        key = chunk.file_key
        reread = self.offsets.is_reread(tp, offset)
        busy = self.ledger.busy(key)
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
        result = self._reassemble(chunk, fresh, tp, offset)
        if result is None:
            return
        if result.status is AddStatus.IGNORED or (result.status is AddStatus.DUPLICATE
                                                  and not busy):
            # A chunk of a file rejected before, or a late duplicate of one settled.
            self.offsets.read(tp, offset)
            if result.status is AddStatus.IGNORED:
                self.recorder.chunk_rejected(self._current, result.reason or "file rejected",
                                             file=chunk.rel_path)
            return
        record = self.ledger.open(key, Role.AGAIN if route is Route.ASSEMBLE_AGAIN
                                  else Role.FIRST)
        if not reread and record.role is Role.FIRST:
            self._count_copy(record, chunk, result.status)
        self._apply(record, result, chunk, tp, offset, size, reread and not busy)

    def _reassemble(self, chunk: Chunk, fresh: bool, tp: tuple[str, int],
                    offset: int) -> AddResult | None:
        """The chunk into the reassembler (``fresh``: forget what it completed of this
        generation before); None when local storage failed (the message then stays
        pending, so a restart reads it again: not the file's fault)."""
        key = chunk.file_key
        if fresh and self.reassembler.is_completed(key):
            self.reassembler.discard(key)  # rebuilt from scratch, not a duplicate
        try:
            return self.reassembler.add(chunk)
        except StorageError as error:
            logger.error("%s", error)
            self.ledger.open(key)
            self.offsets.read(tp, offset, key)
            return None

    def _apply(self, record: FileRecord, result: AddResult, chunk: Chunk,
               tp: tuple[str, int], offset: int, size: int, first_reread: bool) -> None:
        """What the reassembler did decides the message's offset and the record's state."""
        key, status = record.key, result.status
        self.offsets.read(tp, offset, key if record.holds_commit else None)
        # A duplicate (re-read after a rebalance) keeps the file busy but is not counted
        # again: bytes_processed covers the same messages as messages_processed.
        record.message_bytes += 0 if status is AddStatus.DUPLICATE else size
        if status is AddStatus.ACCEPTED:
            if record.role is Role.FIRST:  # a file produced again is not "in progress"
                self.recorder.chunk_added(chunk, tp[1], offset)
            if first_reread and not self.ledger.is_known_pending(key):
                self.ledger.want_lookup(key, self._clock())
            self._stream(record, chunk)
            failpoints.hit("chunk.added")
        elif status is AddStatus.COMPLETED:
            self.ledger.complete(key, result.completed)
        elif status is AddStatus.REJECTED:
            if record.stream is not None:  # its open Girder upload is removed
                record.stream.abandon()
            logger.error("%s", result.rejected.to_error())
            self.counters.files_failed += 1
            self.recorder.file_rejected(result.rejected)
            where = self.offsets.file_offsets(key)
            self.recorder.file_messages_rejected(result.rejected, where if (tp, offset) in where
                                                 else [*where, (tp, offset)])
            self._finish(record, FileState.FAILED)

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
                                            and record.role is Role.FIRST):
            return
        plan = StreamPlan(key[0], key[1], view[0], lambda: reassembler.stream_view(key),
                          lambda start, end: reassembler.read_prefix(key, start, end),
                          self.stream_shared)
        self.ledger.stream(key, self.open_stream(plan))

    def abandon_streams(self, reason: str) -> int:
        """Give up every streamed upload still assembling (partitions revoked or lost:
        another consumer may rebuild the file): each file goes on assembling and is
        uploaded whole if it completes here. Returns how many."""
        streaming = self.ledger.in_state(FileState.STREAMING)
        for record in streaming:
            self.ledger.unstream(record.key).abandon()
        if streaming:
            logger.info("%d streamed upload(s) abandoned: %s", len(streaming), reason)
        return len(streaming)

    def close_streams(self, timeout: float) -> None:
        """At shutdown: abandon the streamed uploads not being finished (bounded)."""
        for state in (FileState.STREAMING, FileState.READY, FileState.WAITING_TO_RETRY):
            for record in self.ledger.in_state(state):
                if record.stream is not None:
                    record.stream.close(timeout)

    def _count_copy(self, record: FileRecord, chunk: Chunk, status: AddStatus) -> None:
        """A new (not re-read) chunk of a file in flight: a duplicate begins counting the
        copies produced again. Only chunks that agree with the file's own chunk count
        are counted (a hostile count must not cost one step per claimed chunk)."""
        key, n_total = record.key, chunk.n_total_chunks
        if status is AddStatus.DUPLICATE and not self.ledger.counting(key):
            received = self.reassembler.received(key)
            if received is None:  # completed: every chunk of the first copy was read
                if record.completed is None or record.completed.n_chunks != n_total:
                    return
                received = range(1, n_total + 1)
            self.ledger.count_repeat(key, n_total, chunk.chunk_i, received)
        elif status in (AddStatus.DUPLICATE, AddStatus.ACCEPTED, AddStatus.COMPLETED):
            self.ledger.count_repeat(key, n_total, chunk.chunk_i, None)

    def _register_repeats(self, key: FileKey) -> None:
        """Register each copy produced again of a settled file (Girder would skip it)."""
        for first in self.ledger.repeats_due(key):
            self.recorder.file_outcome(first, FileOutcome(
                first.rel_path, key, Outcome.SKIPPED_IDENTICAL, "produced again"))
            self.counters.files_skipped += 1

    def _finish(self, record: FileRecord, state: FileState, retry: bool = False,
                in_girder: bool = True) -> None:
        """The one settle path: the record leaves the ledger, its messages are done
        (``retry``: read again by the next run, offsets rule 9; ``in_girder``: Girder
        holds its content, which a file skipped as different is not)."""
        self.ledger.settle(record.key, state, in_girder=in_girder)
        self.offsets.file_done(record.key, retry=retry)

    # -- partitions ----------------------------------------------------------------------
    def assigned(self, partitions: list[PartitionInfo]) -> None:
        """Partitions gained: learn their re-read span (offsets rule 7) and say when
        messages a restart needs are gone from the topic (retention deleted them)."""
        for info in partitions:
            tp = (info.topic, info.partition)
            self.offsets.assigned(tp, info.committed, info.metadata)
            self._log_reread(tp, info.committed or 0)
            if info.committed is not None and info.low is not None and info.low > info.committed:
                logger.error("%s[%d]: offsets %d to %d are gone from the topic (retention) "
                             "although this group never finished them; files with chunks "
                             "there cannot be rebuilt", info.topic, info.partition,
                             info.committed, info.low - 1)
                self.recorder.messages_gone(info.partition, info.committed, info.low)

    def _log_reread(self, tp: tuple[str, int], committed: int) -> None:
        spans = self.offsets.reread_spans(tp)
        if spans is not None and self.offsets.is_reread(tp, committed):
            high = self.offsets.high_watermark(tp)
            logger.info("%s[%d]: a restart reads %d of the %d message(s) of offsets %d to %d "
                        "again (%d span(s)); the rest was done", *tp,
                        sum(b - a for a, b in spans), high - committed, committed, high - 1,
                        len(spans))

    def hand_over(self, tps: list[tuple[str, int]]) -> int:
        """Partitions are being revoked or were lost: drop the files waiting for upload
        or for a retry whose every pending message is on them. The next owner reads those
        messages again from the commit and uploads the files; uploading them here too
        would only race it to Girder. Files already uploading are left to finish.
        Returns how many files were handed over."""
        waiting = (self.ledger.in_state(FileState.READY)
                   + self.ledger.in_state(FileState.WAITING_TO_RETRY))
        handed = [r for r in waiting
                  if r.role is Role.FIRST and self.offsets.only_in(r.key, tps)]
        for record in handed:
            if record.stream is not None:
                record.stream.abandon()
            self.ledger.forget(record.key)
            self.reassembler.discard(record.key)  # so its chunks, if they come back, rebuild it
            self.reassembler.release(record.completed)
            self.recorder.file_dropped(_progress_of(record.completed))
        if handed:
            logger.info("%d file(s) waiting for upload left to the next owner of %s",
                        len(handed), ", ".join(f"{t}[{p}]" for t, p in tps))
        return len(handed)

    # -- restart knowledge from Girder ----------------------------------------------
    def take_probes(self) -> list[FileKey]:
        """Re-read files unknown to the registries, to look up in Girder (rule 7)."""
        return self.ledger.take_lookups(self._clock())

    def probe_result(self, key: FileKey, found: bool | None) -> None:
        """Girder holds this generation (True), does not (False), or could not tell now
        (None: looked up again later). Found while still partial: done (rule 7)."""
        if found is None:
            self.ledger.lookup_unanswered(key, self._clock() + self.retry_delay)
            return
        record = self.ledger.get(key)
        progress = self.reassembler.progress(key)
        if not found or progress is None or record is None \
                or record.state not in (FileState.ASSEMBLING, FileState.RELEASED):
            return  # not there, or completed meanwhile: the upload decides
        logger.info("%s was uploaded before (found in Girder by sha512): its re-read "
                    "chunks are done", key[0])
        self.reassembler.mark_finished(key)
        self.counters.files_found_in_girder += 1
        self.recorder.file_found(progress)
        self._finish(record, FileState.DONE)

    def expire_stale(self) -> None:
        """Release the commit hold of partial files that got no chunk for
        ``stale_partial_seconds`` (rule 4); forget stale copies produced again."""
        now = self._wall_clock()
        if self.stale_partial_seconds is None or now - self._last_stale_check < 1.0:
            return
        self._last_stale_check = now
        stuck_after = min(STUCK_LOOKUP_SECONDS, self.stale_partial_seconds / 2)
        for progress in self.reassembler.in_progress():
            key = (progress.rel_path, bytes.fromhex(progress.file_hash_hex))
            record = self.ledger.get(key)
            if record is not None:
                self._expire(record, progress, now - progress.last_message_at, stuck_after)

    def _expire(self, record: FileRecord, progress: FileProgress, quiet: float,
                stuck_after: float) -> None:
        if quiet >= stuck_after and record.role is Role.FIRST:
            # Maybe its other chunks were committed past before a crash whose last
            # watermark was not committed yet: Girder may already hold it.
            self.ledger.want_lookup(record.key, self._clock())
        if quiet < self.stale_partial_seconds:
            return
        if record.role is Role.AGAIN:
            self.reassembler.discard(record.key)
            self.recorder.file_dropped(progress)
            self.ledger.forget(record.key)
            return
        if record.state is FileState.STREAMING:  # stale: its open upload is removed
            self.ledger.unstream(record.key).abandon()
        if record.state is FileState.ASSEMBLING:
            self.ledger.release(record.key)
            released = self.offsets.file_done(record.key)
            reason = (f"incomplete: {progress.n_received} of {progress.n_total} chunks, "
                      f"none for {self.stale_partial_seconds:g}s; its {released} "
                      f"message(s) were released and are not read again after a restart")
            logger.warning("%s: %s", progress.rel_path, reason)
            self.recorder.file_stale(progress, reason)

    # -- uploading -------------------------------------------------------------------
    def take_units(self) -> list[UploadUnit]:
        """Completed files (and transient failures whose delay passed) as upload units,
        no more at once than ``max_inflight_units``, and no more than the files fill.

        Every unit costs a Prefect task run (about 24 KiB of the server's database, its
        events included), so at low rates files wait for company: until they fill a
        unit, or ``linger_seconds`` have passed since a worker was free for them (the
        lingering never delays a file's upload by more than that)."""
        self.expire_stale()
        free = (1 if self.max_inflight_units is None
                else self.max_inflight_units - len(self._units))
        if free <= 0:
            return []  # every worker busy: sort and pack when one frees up, not each round
        now = self._clock()
        self.ledger.due(now)
        ready = self.ledger.in_state(FileState.READY)
        if not ready:
            self._ready_since = None
            return []
        if self._ready_since is None:
            self._ready_since = now
        if now - self._ready_since < self.linger_seconds \
                and not self._fills_a_unit([r.completed for r in ready]):
            return []  # lingering: more files may come to share the unit
        # Oldest messages first: a partition's commit waits for its lowest pending
        # offset, so uploading in completion order (scrambled across partitions) would
        # hold every commit near the start while the reading runs far ahead.
        ready.sort(key=lambda r: self.offsets.first_offset(r.key))
        files = [r.completed for r in ready]
        self._ready_since = None
        if self.max_inflight_units is None:
            units = group_into_units(files, self._next_unit, self.max_unit_files,
                                     self.max_unit_bytes)
        else:
            # No more units than can run at once, striped: the rest stay READY, so the
            # next unit takes the oldest files when a worker frees up.
            units, rest = stripe_into_units(files, self._next_unit,
                                            min(free, self._units_needed(files)),
                                            self.max_unit_files, self.max_unit_bytes)
            if rest:
                self._ready_since = now - self.linger_seconds  # they waited: no new linger
        self._next_unit += len(units)
        for unit in units:
            self._units[unit.unit_id] = unit
            for completed in unit.files:
                record = self.ledger.get(completed.file_key)
                if record.stream is not None:  # its finishing step sends the rest
                    unit.streams[completed.file_key] = record.stream
                self.ledger.dispatch(completed.file_key, unit.unit_id)
        return units

    def _units_needed(self, files: list[CompletedFile]) -> int:
        """How many units ``files`` fill at least (by count and by bytes): striping a
        few files over every free worker would only cost more task runs."""
        by_count = -(-len(files) // self.max_unit_files)
        by_bytes = -(-sum(f.size for f in files) // self.max_unit_bytes)
        return max(1, by_count, by_bytes)

    def _fills_a_unit(self, files: list[CompletedFile]) -> bool:
        return (len(files) >= self.max_unit_files
                or sum(f.size for f in files) >= self.max_unit_bytes)

    def settle_early(self, unit_id: int, outcome: FileOutcome) -> None:
        """A file of a unit still running has landed (or failed for good): settle it now,
        so its offsets need not wait for the rest of the unit. Transient outcomes wait
        for the unit's result (its retry decides)."""
        if outcome.outcome.durable:
            self.settle(unit_id, outcome)

    def finish_unit(self, unit: UploadUnit, outcomes: list[FileOutcome]) -> None:
        """Settle each file of a unit from its outcome (files settled early are left
        alone); a missing outcome is transient."""
        self._units.pop(unit.unit_id, None)
        by_key = {o.file_key: o for o in outcomes}
        for completed in unit.files:
            key = completed.file_key
            self.settle(unit.unit_id, by_key.get(key) or FileOutcome(
                completed.rel_path, key, Outcome.FAILED_TRANSIENT, "no outcome reported"))
        for completed in unit.files:
            # Only now that the unit is over (a retry of the task re-reads its files),
            # and only if no retry of this very file waits for it.
            record = self.ledger.get(completed.file_key)
            if record is None or record.completed is not completed:
                self.reassembler.release(completed)

    def fail_unit(self, unit: UploadUnit, reason: str) -> None:
        """A whole unit failed (its task crashed or ran out of retries): retry it later."""
        self.finish_unit(unit, [FileOutcome(f.rel_path, f.file_key,
                                            Outcome.FAILED_TRANSIENT, reason) for f in unit.files])

    def settle(self, unit_id: int, outcome: FileOutcome) -> None:
        """One file's upload outcome, from either report; the first one counts."""
        record = self.ledger.get(outcome.file_key)
        if record is None or record.state is not FileState.UPLOADING \
                or record.unit_id != unit_id:
            return  # settled already (reported early), or no longer ours
        completed = record.completed
        failed = outcome.outcome is Outcome.FAILED_TERMINAL
        if failed and record.role is Role.FIRST:
            outcome = replace(outcome, reason=f"{outcome.reason}; {RETRIED_NEXT_RUN}")
        self.recorder.file_outcome(completed, outcome)
        if not outcome.outcome.durable:
            logger.warning("upload of %s failed (%s); retrying in %.0fs",
                           completed.rel_path, outcome.reason, self.retry_delay)
            self.ledger.retry_later(record.key, self._clock() + self.retry_delay)
            return
        self._count_outcome(completed, outcome)
        self.last_settled_at = self._clock()
        self.counters.messages_processed += completed.n_chunks
        self.counters.bytes_processed += record.message_bytes or completed.size
        self._finish(record, FileState.FAILED if failed else FileState.DONE,
                     retry=failed and record.role is Role.FIRST,
                     in_girder=outcome.outcome is not Outcome.SKIPPED_DIFFERENT)
        if failed:
            self.counters.files_to_retry += 1
        else:
            self._register_repeats(record.key)

    def _count_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None:
        if outcome.outcome is Outcome.FAILED_TERMINAL:
            logger.error("upload of %s failed for good: %s", completed.rel_path, outcome.reason)
            self.counters.files_failed += 1
        elif outcome.outcome in (Outcome.UPLOADED, Outcome.REPLACED):
            self.counters.files_uploaded += 1
        else:
            self.counters.files_skipped += 1

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
        """Nothing waiting, uploading or waiting to retry. Files still assembling do not
        count: without new messages they cannot progress."""
        return not (self._units or self.ledger.count(
            FileState.READY, FileState.UPLOADING, FileState.WAITING_TO_RETRY))
