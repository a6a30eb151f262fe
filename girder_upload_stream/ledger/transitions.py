"""The named transitions that end or change a file's life, each returning the effects it
calls for (:mod:`.effects`) instead of acting on the reassembler, the offset tracker,
the stream session and the registries itself. A mixin of the
:class:`~girder_upload_stream.ledger.records.FileLedger`: a transition changes the
record (its state, through the ledger's checked moves) and says what must follow; the
processor carries that out in one place. Pure: no Prefect, Kafka or Girder."""

from __future__ import annotations

import logging
from dataclasses import replace

from girder_upload_stream.shared_types import RETRIED_NEXT_RUN, FileProgress, RejectedFile
from girder_upload_stream.ledger.effects import (AbandonStream, DropAssembly, Effect,
                                                 FinishAssembly, ReleaseOffsets,
                                                 ReleaseStaging, WriteRow)
from girder_upload_stream.ledger.states import FileState
from girder_upload_stream.wire.codec import FileKey

__all__ = ["FileTransitions"]

logger = logging.getLogger(__name__)


class FileTransitions:
    """Transitions with effects (see the module); the ledger's moves do the checking."""

    def finish(self, key: FileKey, state: FileState, retry: bool = False,
               in_girder: bool = True) -> list[Effect]:
        """-> DONE or FAILED (:meth:`settle`): the record leaves, its messages are done
        (``retry``: read again by the next run, offsets rule 9; ``in_girder``: Girder
        holds its content, which a file skipped as different is not)."""
        record = self.settle(key, state, in_girder=in_girder)
        return [ReleaseOffsets(record.pending, retry)]

    def reject(self, key: FileKey, rejected: RejectedFile,
               last: tuple[tuple[str, int], int]) -> tuple[RejectedFile, list[Effect]]:
        """The reassembler rejected the file (``last``: where the message that did it
        is) -> FAILED: its open upload is abandoned, its row written, its messages go to
        the dead-letter topic and are done; when only its bytes failed, the next run
        reads them again (the reason says so). Returns the rejection as recorded."""
        record = self._records[key]
        retry = rejected.retry and record.holds_commit
        if retry:  # only its bytes failed: another reading may bring a clean copy
            rejected = replace(rejected, reason=f"{rejected.reason}; {RETRIED_NEXT_RUN}")
        where = list(record.pending.where)
        effects = self._abandon(record)
        effects += [WriteRow("file_rejected", (rejected,)), WriteRow(
            "file_messages_rejected", (rejected, where if last in where else [*where, last]))]
        return rejected, effects + self.finish(key, FileState.FAILED, retry=retry)

    def hand_over(self, key: FileKey) -> list[Effect]:
        """A file waiting for upload or for a retry -> gone: the next owner of its
        partitions reads its messages again and uploads it. Its stream is abandoned, its
        chunks and staging file let go, its in-progress row removed."""
        record = self.forget(key)
        return self._abandon(record) + [
            DropAssembly(key), ReleaseStaging(record.completed),
            WriteRow("file_dropped", (record.progress(),))]

    def drop(self, key: FileKey) -> list[Effect]:
        """A file being rebuilt that holds no commit -> gone: a stale copy produced
        again, or a released file forgotten at the bound of files in progress (the
        messages it got since its release are done with it: nothing else would ever
        release them); a released file's stale row stays."""
        released = self._records[key].state is FileState.RELEASED
        record = self.forget(key)
        progress = record.progress()
        # A released file keeps its stale row: it says why its messages are not read
        # again (those it got since go with it).
        return self._abandon(record) + [DropAssembly(key), ReleaseOffsets(record.pending)] \
            + ([WriteRow("file_dropped", (progress,))]
               if progress is not None and not released else [])

    def found(self, key: FileKey, progress: FileProgress) -> list[Effect]:
        """A partial file found in Girder (offsets rule 7) -> DONE: the reassembler takes
        its later chunks for duplicates, its row says so, its messages are done."""
        return [FinishAssembly(key), WriteRow("file_found", (progress,))] \
            + self.finish(key, FileState.DONE)

    def abandon_stream(self, key: FileKey, for_good: bool = False) -> list[Effect]:
        """STREAMING -> ASSEMBLING: its streamed upload is given up (``for_good``: and
        none is opened again for this record, e.g. competing copies are held); the file
        is uploaded whole once complete."""
        record = self._records.get(key)
        if record is None:
            return []
        if for_good:
            record.stream_tried = True
        return [AbandonStream(self.unstream(key))] \
            if record.state is FileState.STREAMING else []

    def go_stale(self, key: FileKey, progress: FileProgress, quiet: float) -> list[Effect]:
        """ASSEMBLING (or STREAMING) -> RELEASED: no chunk for ``quiet`` seconds (offsets
        rule 4): its open upload is abandoned, its messages released (not read again
        after a restart) and its row says why."""
        effects = self.abandon_stream(key)
        record = self._records[key]
        if record.state is not FileState.ASSEMBLING:
            return effects  # released before
        self.release(key)
        reason = (f"incomplete: {progress.n_received} of {progress.n_total} chunks, none "
                  f"for {quiet:g}s; its {len(record.pending)} message(s) were released "
                  f"and are not read again after a restart")
        logger.warning("%s: %s", progress.rel_path, reason)
        return effects + [ReleaseOffsets(record.pending),
                          WriteRow("file_stale", (progress, reason))]

    def _abandon(self, record) -> list[Effect]:
        """The stream of a record leaving the ledger, if it has one."""
        return [AbandonStream(record.stream)] if record.stream is not None else []
