"""Which Kafka offsets may be committed, and which messages are re-reads: the
at-least-once rule, in one place.

The rules (what must be durable before an offset may be committed; the order of a
commit's steps, from this plan to the broker, is written once, in
:class:`~girder_upload_stream.loop.checkpoint.Checkpoint`):

1. A message is *pending* from the moment it is read until its fate is durable.
2. A message whose file is uploaded to Girder (or found there already with the same
   content) is done once the upload call has returned successfully.
3. A message that can never become a file (undecodable, no key, unsafe name, a chunk
   refused on its own -- impossible for its file, over a bound of competing copies, but
   not at the bound of files in progress: rule 10 --, filtered out by
   ``--download_regex``, a duplicate of a finished file) is done once it is recorded
   (log and registry); retrying it could not help. So is a chunk stored before its own
   sha512 was checked (lazy checks) and found lying since: it leaves its file's
   pending messages when it is recorded.
4. A message of a file still in progress, waiting for upload, or whose upload failed
   with a transient error, stays pending: it must be read again after a restart.
   Exception: a partial file that got no chunk for ``stale_partial_seconds`` is
   recorded as failed (with its first offsets) and its messages are released, so one
   file whose producer died cannot hold a partition back for ever.
5. The registries are saved (atomically) before offsets are committed, so every file
   whose messages a commit passes is listed as processed or failed on disk first.
6. Per partition, the committable offset is the lowest pending offset, or one past the
   highest offset read when nothing is pending. Offsets only move forward.
7. Every commit carries, in its Kafka metadata (``gus1:hw=N``), the partition's high
   watermark ``N``: one past the highest offset ever read by this group. On assignment
   the committed offset ``C`` and ``N`` split the partition: ``[C, N)`` is re-read,
   ``N`` on is new.
8. The metadata also lists the pending spans of ``[C, N)`` (``;p=``): every message of
   ``[C, N)`` outside them was done when the commit was made, so a restart seeks over
   those gaps instead of reading them again. The list is capped (Kafka keeps a few KiB
   of metadata): a cut list's last span runs to ``N``. Without a list (older commits),
   all of ``[C, N)`` is read again.

9. A file whose upload failed for good (Girder refused it), or none of whose copies
   verified (mismatched hash: only its bytes failed), does not hold the commit,
   but its messages are listed in the metadata too (``;f=``, the *retry spans*, also
   below ``C``): the next run of the group seeks back to them, rebuilds the file and
   tries its upload again. The list is capped like rule 8's; a file cut from it is
   still listed as failed in the registry, but not retried by itself.
10. A chunk that would begin one more file at the bound of files in progress
    (``--max_files_in_progress``) is *put off*: pending (it holds the commit and is in
    rule 8's list), but taken by no file. Reading goes on past it, so that the files in
    progress get their chunks and complete (nothing waits for a put-off chunk: no
    deadlock); once a file could take it (room under the bound, or its file begun
    meanwhile), its partition is read again from the first put-off chunk, skipping what
    this run handled already. A put-off chunk is never committed past before it is taken.

On restart, the re-read span holds the pending messages plus the finished ones between
them (the bounded overlap). A re-read message of a file the registry (or its Prefect
artifact) lists as processed is done at once (rule 3). A re-read file the registry does
not know is looked up in Girder by name and sha512 before it may hold a commit: found,
it is done. A *new* message (``>= N``) of a file processed before is a second
production of it: it is rebuilt and recorded again (the processed table lists it twice)
and Girder skips the identical content; a copy that begins while the first is still on
its way to Girder is counted, not rebuilt (:mod:`girder_upload_stream.copies`). Commits without our metadata (e.g. made by
OpenMSIStream) give ``N = C``: nothing counts as re-read.

Trade-offs, on purpose: a second production's messages are done at once (Girder holds
its content already), so a crash while it is being rebuilt loses only its second
processed row. A re-read file that Girder cannot identify (a file without sha512, e.g.
on an assetstore that does not hash) waits for the stale-partial release.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping

from girder_upload_stream.wire.commit_metadata import (MAX_FAILED_CHARS, MAX_SPANS_CHARS, Span,
                                                  TopicPartition, format_metadata,
                                                  merge_spans, parse_failed, parse_metadata,
                                                  parse_spans, spans_of)
from girder_upload_stream.ledger.put_off import PutOffChunks

# The metadata codec is re-exported: the rules and their text travel together.
__all__ = ["TopicPartition", "Span", "OffsetTracker", "PendingOffsets", "safe_offsets",
           "MAX_SPANS_CHARS", "MAX_FAILED_CHARS", "format_metadata", "parse_metadata",
           "parse_spans", "parse_failed", "spans_of"]


def safe_offsets(next_offsets: Mapping[TopicPartition, int],
                 pending: Mapping[TopicPartition, Collection[int]],
                 committed: Mapping[TopicPartition, int],
                 tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
    """Rule 6 per partition read (of ``tps``, all when None): the lowest pending offset,
    or one past the last read when none is pending (``next_offsets``), where it moved
    past the last commit. Also the re-key hop's rule (loop/rekey_book.py), with the
    messages not acknowledged yet as its pending ones."""
    result = {}
    for tp in (list(next_offsets) if tps is None else tps):
        if tp not in next_offsets:
            continue
        waiting = pending.get(tp)
        safe = min(waiting) if waiting else next_offsets[tp]
        if safe > committed.get(tp, -1):
            result[tp] = safe
    return result


class PendingOffsets:
    """Where the pending messages of one file are (rule 1): the per-file part of the
    tracker, held by the file's ledger record (the tracker's per-partition tables point
    to it, so that forgetting a partition also forgets its messages here)."""

    __slots__ = ("where",)

    def __init__(self) -> None:
        self.where: list[tuple[TopicPartition, int]] = []

    def __len__(self) -> int:
        return len(self.where)

    def first_offset(self) -> int:
        """The lowest pending offset (any partition; -1 if none): uploading files in
        this order lets commits advance while the uploads lag behind reading."""
        return min(offset for _, offset in self.where) if self.where else -1

    def only_in(self, tps: Iterable[TopicPartition]) -> bool:
        """True if every pending message is on one of ``tps`` (and there is one): losing
        those partitions hands the whole file to their next owner."""
        lost = set(tps)
        return bool(self.where) and all(tp in lost for tp, _ in self.where)


class OffsetTracker:
    """Tracks pending messages per partition, and per file in the file's
    :class:`PendingOffsets` (a caller may also name files by any other key: the tracker
    then keeps their :class:`PendingOffsets`); not thread-safe by design (the flow's
    polling loop owns it)."""

    def __init__(self, admits: Callable[[Callable[[Hashable], bool]], bool]
                 = lambda has_put_off: True) -> None:
        #: Whether a file could take a put-off chunk now (rule 10); it gets a test of
        #: whether a file (a key) has put-off chunks on the partition considered.
        self.admits = admits
        self._next: dict[TopicPartition, int] = {}
        self._at: dict[TopicPartition, int] = {}  # one past the offset read last
        self._pending: dict[TopicPartition, dict[int, PendingOffsets]] = {}
        self._by_key: dict[Hashable, PendingOffsets] = {}  # files named by a key
        self._committed: dict[TopicPartition, int] = {}
        self._committed_meta: dict[TopicPartition, str | None] = {}
        self._floor: dict[TopicPartition, int] = {}  # the committed offset at assignment
        self._reread_below: dict[TopicPartition, int] = {}
        self._inherited: dict[TopicPartition, list[Span]] = {}  # rule 8's list, if any
        self._sought: dict[TopicPartition, int] = {}
        # Rule 9: offsets of files whose upload failed for good in this run; the retry
        # spans inherited at assignment, where to seek back to read them, and how far
        # reading below the committed offset has come.
        self._failed: dict[TopicPartition, set[int]] = {}
        self._retry: dict[TopicPartition, list[Span]] = {}
        self._back_to: dict[TopicPartition, int] = {}
        self._below: dict[TopicPartition, tuple[int, int]] = {}  # (committed, next below it)
        # Rule 10: the put-off chunks of each partition (held in _pending by one
        # PendingOffsets per partition, so that they hold the commit).
        self._put_off: dict[TopicPartition, PutOffChunks] = {}
        self._put_off_holder: dict[TopicPartition, PendingOffsets] = {}

    def assigned(self, tp: TopicPartition, committed: int | None,
                 metadata: str | None) -> None:
        """Learn a partition's committed offset, the high watermark in its commit
        metadata (rule 7), its pending spans (rule 8) and its retry spans (rule 9); a
        commit without our metadata marks nothing as re-read."""
        start = committed if committed is not None and committed >= 0 else 0
        high = parse_metadata(metadata)
        below = max(start, high if high is not None else start)
        self._floor[tp], self._reread_below[tp] = start, below
        self._sought.pop(tp, None)
        spans = parse_spans(metadata, start) if high is not None else None
        retry = [] if spans is None else [(a, min(b, below)) for a, b in parse_failed(metadata)
                                          if min(b, below) > a]
        if spans is None:
            self._inherited.pop(tp, None)
        else:
            self._inherited[tp] = merge_spans([(max(a, start), min(b, below)) for a, b in spans
                                          if min(b, below) > max(a, start)] + retry)
        self._learn_retry(tp, start, retry)
        if committed is not None and committed >= 0:
            self._committed[tp] = max(self._committed.get(tp, -1), committed)
            self._committed_meta[tp] = metadata

    def _learn_retry(self, tp: TopicPartition, start: int, retry: list[Span]) -> None:
        """Rule 9: read the failed files below the commit again, from the first one."""
        self._retry[tp] = retry
        if retry and retry[0][0] < start:
            self._floor[tp] = self._back_to[tp] = retry[0][0]
            self._below[tp] = (start, retry[0][0])
        else:
            self._back_to.pop(tp, None)
            self._below.pop(tp, None)

    def is_reread(self, tp: TopicPartition, offset: int) -> bool:
        """True if an earlier owner of this group already read ``offset`` (rule 7)."""
        return offset < self._reread_below.get(tp, 0)

    def skippable(self, tp: TopicPartition, offset: int) -> bool:
        """True if ``offset`` was done when the last owner committed (rule 8): it lies in
        ``[C, N)`` outside every pending span that commit listed."""
        spans = self._inherited.get(tp)
        if spans is None or not self._floor[tp] <= offset < self._reread_below[tp]:
            return False
        i = bisect.bisect_right(spans, (offset, float("inf"))) - 1
        return not (i >= 0 and offset < spans[i][1])

    def take_seeks(self) -> dict[TopicPartition, int]:
        """``{tp: offset}`` to seek to now: the next pending span (or ``N``) for each
        partition whose next offset to read lies in a gap of rule 8's list."""
        seeks = {tp: target for tp, target in self._back_to.items()
                 if self._sought.get(tp) != target}
        self._replay_seeks(seeks)
        for tp, spans in self._inherited.items():
            if tp in seeks:
                continue
            upcoming = self._at.get(tp, self._floor[tp])
            if not self.skippable(tp, upcoming):
                continue
            i = bisect.bisect_right(spans, (upcoming, float("inf")))
            target = spans[i][0] if i < len(spans) else self._reread_below[tp]
            if self._sought.get(tp) != target:
                seeks[tp] = target
        return seeks

    def _replay_seeks(self, seeks: dict[TopicPartition, int]) -> None:
        """Rule 10: seek back to the first put-off chunk of each partition read up to
        its end of this run (no pass under way) where a file could now take one."""
        for tp, put_off in self._put_off.items():
            if tp not in seeks:
                target = put_off.seek_back(self._at.get(tp, 0), self.admits)
                if target is not None:
                    seeks[tp] = target

    def put_off(self, tp: TopicPartition, offset: int, file: Hashable) -> bool:
        """Rule 10: the chunk at ``offset`` would begin ``file`` at the bound of files in
        progress: pending, taken by no file, read again later. True the first time."""
        self.read(tp, offset)
        holder = self._put_off_holder.setdefault(tp, PendingOffsets())
        self._pending.setdefault(tp, {})[offset] = holder
        return self._put_off[tp].put_off(offset, file)

    def is_put_off(self, tp: TopicPartition, offset: int) -> bool:
        """True if the chunk at ``offset`` waits at the bound of files in progress."""
        put_off = self._put_off.get(tp)
        return put_off is not None and offset in put_off.offsets

    def put_off_count(self) -> int:
        """Chunks put off at the bound of files in progress, not taken yet (rule 10)."""
        return sum(len(p) for p in self._put_off.values())

    def replayed(self, tp: TopicPartition, offset: int) -> bool:
        """True for a message this run handled already, fetched again by rule 10's seek
        back to a put-off chunk: it is skipped (taking it again would take it twice)."""
        put_off = self._put_off.get(tp)
        if put_off is None or not put_off.seen_before(offset):
            return False
        self._at[tp] = offset + 1
        return True

    def before_back_seek(self, tp: TopicPartition, offset: int) -> bool:
        """True for a message fetched before rule 9's seek back took effect: the consumer
        began at the committed offset, and it reads this message again once it has gone
        back. Taken now, it would be taken twice (the second time as a new production of
        a file already done)."""
        target = self._back_to.get(tp)
        return target is not None and offset >= target

    def sought(self, tp: TopicPartition, offset: int) -> None:
        """The consumer now reads ``tp`` from ``offset`` (so it is not asked again)."""
        self._sought[tp] = offset
        if self._back_to.get(tp) == offset:
            del self._back_to[tp]
        put_off = self._put_off.get(tp)
        if put_off is not None and put_off.sought(offset):  # rule 10: a pass from there
            self._at[tp] = offset

    def reread_spans(self, tp: TopicPartition) -> list[Span] | None:
        """Rule 8's pending spans inherited at assignment (None: no list)."""
        return self._inherited.get(tp)

    def high_watermark(self, tp: TopicPartition) -> int:
        """One past the highest offset this group has read of ``tp`` (for metadata)."""
        return max(self._next.get(tp, 0), self._reread_below.get(tp, 0))

    def pending_spans(self, tp: TopicPartition, committed: int) -> list[Span]:
        """What a restart must read of ``[committed, N)`` (rule 8): the pending messages
        read so far, and what is still unread of the span inherited at assignment. A run
        of pending offsets that begins below ``committed`` (a failed file read again by
        rule 9) counts from ``committed`` on: its lower part is rule 9's list."""
        spans = [(max(a, committed), b) for a, b in spans_of(self._pending.get(tp, ()))
                 if b > committed]
        upcoming = max(self._next.get(tp, 0), committed)
        inherited = self._inherited.get(tp, [(self._floor.get(tp, 0),
                                              self._reread_below.get(tp, 0))])
        for start, end in inherited:
            if end > max(start, upcoming):
                spans.append((max(start, upcoming), end))
        return merge_spans(spans)

    def failed_spans(self, tp: TopicPartition, committed: int) -> list[Span]:
        """Rule 9's retry spans: messages of files whose upload failed for good, those
        pending below ``committed`` (a retry under way), and the inherited ones not yet
        read again."""
        pending = [o for o in self._pending.get(tp, ()) if o < committed]
        spans = list(spans_of([*self._failed.get(tp, ()), *pending]))
        below = self._below.get(tp)
        if below is not None:
            upcoming = below[1]
            # Those at or past the commit are rule 8's business (pending_spans).
            spans += [(max(a, upcoming), min(b, below[0])) for a, b in self._retry.get(tp, ())
                      if min(b, below[0]) > max(a, upcoming)]
        return merge_spans(spans)

    def _file(self, file: PendingOffsets | Hashable, keep: bool) -> PendingOffsets | None:
        if isinstance(file, PendingOffsets):
            return file
        return (self._by_key.setdefault(file, PendingOffsets()) if keep
                else self._by_key.pop(file, None))

    def read(self, tp: TopicPartition, offset: int,
             file: PendingOffsets | Hashable | None = None) -> None:
        """Record a message just read, pending for ``file`` (None: already done)."""
        self._at[tp] = offset + 1
        put_off = self._put_off.get(tp)
        if put_off is None:
            put_off = self._put_off[tp] = PutOffChunks()
        put_off.handled(offset)
        if put_off.take(offset):  # a put-off chunk taken at last (rule 10)
            del self._pending[tp][offset]
        below = self._below.get(tp)
        if below is not None and offset < below[0]:
            self._below[tp] = (below[0], max(below[1], offset + 1))
            self._next.setdefault(tp, offset + 1)
        else:
            self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        if file is not None:
            pending = self._file(file, keep=True)
            self._pending.setdefault(tp, {})[offset] = pending
            pending.where.append((tp, offset))

    def file_done(self, file: PendingOffsets | Hashable, retry: bool = False) -> int:
        """Mark every pending message of a file done; returns how many there were.
        ``retry``: its upload failed for good, so the next run reads them again (rule 9)."""
        released, file = 0, self._file(file, keep=False)
        for tp, offset in file.where if file is not None else ():
            pending = self._pending.get(tp)
            if pending is not None and pending.pop(offset, None) is not None:
                released += 1
                if retry:
                    self._failed.setdefault(tp, set()).add(offset)
        if file is not None:
            file.where.clear()
        return released

    def message_done(self, tp: TopicPartition, offset: int) -> None:
        """One message pending for a file is done on its own (rule 3: a chunk found
        lying after it was stored); its file's other messages stay pending."""
        pending = self._pending.get(tp)
        file = pending.pop(offset, None) if pending is not None else None
        if file is not None and (tp, offset) in file.where:
            file.where.remove((tp, offset))

    def has_file(self, file: Hashable) -> bool:
        """True while any message of a file named by a key is pending."""
        return bool(self._by_key.get(file))

    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self, tps: Iterable[TopicPartition] | None = None
                    ) -> dict[TopicPartition, int]:
        """Safe offsets (rule 6) that moved forward since the last commit."""
        return safe_offsets(self._next, self._pending, self._committed, tps)

    def commit_plan(self, tps: Iterable[TopicPartition] | None = None
                    ) -> dict[TopicPartition, tuple[int, str]]:
        """``{tp: (offset, metadata)}`` to commit now: partitions whose safe offset moved
        forward, or whose metadata (high watermark, pending spans) changed since the
        last commit (rules 7 and 8)."""
        moved = self.committable(tps)
        result = {}
        for tp in (self._next if tps is None else tps):
            if tp not in self._next:
                continue
            offset = moved.get(tp, self._committed.get(tp, -1))
            if offset < 0:
                continue
            metadata = format_metadata(self.high_watermark(tp), offset,
                                       self.pending_spans(tp, offset),
                                       self.failed_spans(tp, offset))
            if tp in moved or metadata != self._committed_meta.get(tp):
                result[tp] = (offset, metadata)
        return result

    def committed(self, offsets: dict[TopicPartition, int | tuple[int, str]]) -> None:
        """Remember what the broker accepted (offsets, or ``(offset, metadata)`` as
        :meth:`commit_plan` gives them), so it is not committed again."""
        for tp, value in offsets.items():
            offset, metadata = value if isinstance(value, tuple) else (value, None)
            if offset >= self._committed.get(tp, -1):
                self._committed[tp] = offset
                self._committed_meta[tp] = metadata

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop partitions this process no longer owns (after a rebalance).

        Their pending messages will be delivered again to the new owner from the last
        committed offset, so forgetting them loses nothing.
        """
        for tp in tps:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            self._committed_meta.pop(tp, None)
            self._floor.pop(tp, None)
            self._reread_below.pop(tp, None)
            self._inherited.pop(tp, None)
            self._sought.pop(tp, None)
            for table in (self._failed, self._retry, self._back_to, self._below, self._at,
                          self._put_off, self._put_off_holder):
                table.pop(tp, None)
            for offset, file in self._pending.pop(tp, {}).items():
                file.where[:] = [e for e in file.where if e != (tp, offset)]
            self._by_key = {k: f for k, f in self._by_key.items() if f.where}
