"""Which Kafka offsets may be committed: the at-least-once rule, in one place.

Commit order (what must be durable before an offset may be committed):

1. A message is *pending* from the moment it is read until its fate is durable.
2. A message whose file is uploaded to Girder (or found there already with the same
   content) is done once the upload call has returned successfully.
3. A message that can never become a file (undecodable, unsafe name, mismatched hash,
   filtered out by ``--download_regex``, a duplicate of a finished file) is done once it
   is recorded (log and registry); retrying it could not help.
4. A message of a file still in progress, waiting for upload, or whose upload failed
   with a transient error, stays pending: it must be read again after a restart.
5. Per partition, the committable offset is the lowest pending offset, or one past the
   highest offset read when nothing is pending. Offsets only move forward.

So a crash at any point re-reads every message not yet reflected in Girder (plus
finished messages above the lowest pending one, which re-assemble into files that
Girder already holds and are skipped by checksum): nothing lost, nothing doubled.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

__all__ = ["TopicPartition", "OffsetTracker"]

TopicPartition = tuple[str, int]


class OffsetTracker:
    """Tracks pending messages per partition and per file; not thread-safe by design
    (the flow's polling loop owns it)."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        self._pending: dict[TopicPartition, dict[int, Hashable]] = {}
        self._by_file: dict[Hashable, list[tuple[TopicPartition, int]]] = {}
        self._committed: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int, file_key: Hashable | None = None) -> None:
        """Record a message just read; ``file_key`` None means it is already done."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        if file_key is None:
            return
        self._pending.setdefault(tp, {})[offset] = file_key
        self._by_file.setdefault(file_key, []).append((tp, offset))

    def file_done(self, file_key: Hashable) -> int:
        """Mark every pending message of a file done; returns how many there were."""
        released = 0
        for tp, offset in self._by_file.pop(file_key, ()):
            pending = self._pending.get(tp)
            if pending is not None and pending.pop(offset, None) is not None:
                released += 1
        return released

    def has_file(self, file_key: Hashable) -> bool:
        """True while any message of this file is pending."""
        return file_key in self._by_file

    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets that may be committed now and differ from the last commit (rule 5)."""
        result = {}
        for tp in (self._next if tps is None else tps):
            if tp not in self._next:
                continue
            pending = self._pending.get(tp)
            safe = min(pending) if pending else self._next[tp]
            if safe > self._committed.get(tp, -1):
                result[tp] = safe
        return result

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Remember offsets the broker accepted, so they are not committed again."""
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop partitions this process no longer owns (after a rebalance).

        Their pending messages will be delivered again to the new owner from the last
        committed offset, so forgetting them loses nothing.
        """
        for tp in tps:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            for offset, file_key in self._pending.pop(tp, {}).items():
                entries = self._by_file.get(file_key)
                if entries is not None:
                    entries[:] = [e for e in entries if e != (tp, offset)]
                    if not entries:
                        del self._by_file[file_key]
