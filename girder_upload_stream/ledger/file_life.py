"""The parts of the :class:`~girder_upload_stream.ledger.processor.StreamProcessor` that
follow files beyond their messages: partitions gained and lost (what a restart reads
again, which files go to the next owner), what Girder says of re-read files, and files
that stop arriving (stale, or forgotten at the bound of files in progress); and chunks
that wait at that bound (offsets rule 10: back-pressure, not loss). A mixin of
the processor: it works on its ledger, offsets, reassembler and recorder."""

from __future__ import annotations

import logging
from collections.abc import Callable

from girder_upload_stream.shared_types import FileProgress, PartitionInfo, RawMessage
from girder_upload_stream.ledger.records import FileRecord, FileState, Role
from girder_upload_stream.wire.codec import Chunk, FileKey

__all__ = ["FileLife", "STUCK_LOOKUP_SECONDS"]

logger = logging.getLogger(__name__)

#: A partial file quiet for this long (or half of stale_partial_seconds) is looked up in
#: Girder once: its chunks may have been finished before a crash (offsets rule 7).
STUCK_LOOKUP_SECONDS = 30.0


class FileLife:
    """Partitions, Girder lookups of re-read files, stale files (see the module)."""

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
        handed = [r for r in waiting if r.role is Role.FIRST and r.pending.only_in(tps)]
        for record in handed:  # its chunks, if they come back, rebuild it
            self._carry_out(self.ledger.hand_over(record.key))
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
        if not found or record is None or record.assembly is None \
                or record.state not in (FileState.ASSEMBLING, FileState.RELEASED):
            return  # not there, or completed meanwhile: the upload decides
        logger.info("%s was uploaded before (found in Girder by sha512): its re-read "
                    "chunks are done", key[0])
        self.counters.files_found_in_girder += 1
        self._carry_out(self.ledger.found(key, record.progress()))

    def expire_stale(self) -> None:
        """Release the commit hold of partial files that got no chunk for
        ``stale_partial_seconds`` (rule 4); forget stale copies produced again."""
        now = self._wall_clock()
        if self.stale_partial_seconds is None or now - self._last_stale_check < 1.0:
            return
        self._last_stale_check = now
        stuck_after = min(STUCK_LOOKUP_SECONDS, self.stale_partial_seconds / 2)
        for record in self.ledger.in_state(FileState.ASSEMBLING) + self.ledger.in_state(
                FileState.STREAMING) + self.ledger.in_state(FileState.RELEASED):
            if record.assembly is not None:
                progress = record.assembly.progress()
                self._expire(record, progress, now - progress.last_message_at, stuck_after)

    def _expire(self, record: FileRecord, progress: FileProgress, quiet: float,
                stuck_after: float) -> None:
        if quiet >= stuck_after and record.role is Role.FIRST:
            # Maybe its other chunks were committed past before a crash whose last
            # watermark was not committed yet: Girder may already hold it.
            self.ledger.want_lookup(record.key, self._clock())
        if quiet < self.stale_partial_seconds:
            return
        self._carry_out(self.ledger.drop(record.key) if record.role is Role.AGAIN else
                        self.ledger.go_stale(record.key, progress, self.stale_partial_seconds))

    def _put_off(self, msg: RawMessage, chunk: Chunk) -> None:
        """At the bound of files in progress, the chunk that would begin one more file
        waits (offsets rule 10): it holds the commit and is read again once a file makes
        room. Back-pressure, not loss: reading goes on meanwhile, so the files in
        progress get their chunks and complete (they never wait for this one)."""
        tp = (msg.topic, msg.partition)
        if not self.offsets.put_off_count():
            logger.info("%d files in progress (--max_files_in_progress): chunks of further "
                        "files wait, read again once files complete",
                        self.reassembler.files_in_progress)
        if self.offsets.put_off(tp, msg.offset, chunk.file_key):
            self.counters.messages_put_off += 1

    def _could_take(self, has_put_off: Callable[[FileKey], bool]) -> bool:
        """Whether a put-off chunk could be taken now: room under the bound (a stale file
        released makes room too), or a file being rebuilt has put-off chunks (begun
        meanwhile from another chunk: they are no new file). O(files in progress)."""
        bound = self.reassembler.max_files_in_progress
        if bound is None or self.reassembler.files_in_progress < bound \
                or self.ledger.count(FileState.RELEASED):
            return True
        return any(has_put_off(key) for key in self.reassembler.begun())

    def _evict_released(self) -> bool:
        """At the bound of files in progress, make room by forgetting the file released
        longest ago (stale: its messages were released then, it holds no commit); False
        if there is none."""
        released = self.ledger.in_state(FileState.RELEASED)
        if not released:
            return False
        oldest = min(released, key=lambda r: r.assembly.last_at if r.assembly else 0.0)
        self._carry_out(self.ledger.drop(oldest.key))
        return True

