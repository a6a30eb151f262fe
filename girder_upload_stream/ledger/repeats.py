"""Copies of a file produced again while its first copy is on its way: counted, not
rebuilt (:class:`RepeatCounter`), and each whole copy registered once the first is
settled. A mixin of the :class:`~girder_upload_stream.ledger.records.FileLedger` (its
``_repeats`` and ``_settled`` memories)."""

from __future__ import annotations

from collections.abc import Iterator

from girder_upload_stream.assembly.outcomes import AddStatus
from girder_upload_stream.shared_types import CompletedFile
from girder_upload_stream.wire.codec import FileKey

__all__ = ["RepeatCounter", "CopyCounts"]


class RepeatCounter:
    """Whole copies of one generation read, in O(1) per chunk whatever its chunk count.

    ``count[i]`` is how often chunk ``i`` was read; ``level[k]`` how many chunk numbers
    were read at least ``k`` times. Copy ``k`` is whole when ``level[k]`` reaches the
    chunk count."""

    __slots__ = ("n_total", "count", "level", "whole", "registered")

    def __init__(self, n_total: int, received: Iterator[int] | list[int]) -> None:
        self.n_total = n_total
        self.count: dict[int, int] = {}
        self.level: dict[int, int] = {}
        self.whole = 0
        self.registered = 1  # the first copy is registered by its own settlement
        for chunk_i in received:
            self.add(chunk_i)

    def add(self, chunk_i: int) -> None:
        seen = self.count.get(chunk_i, 0) + 1
        self.count[chunk_i] = seen
        self.level[seen] = self.level.get(seen, 0) + 1
        if self.level[seen] == self.n_total and seen > self.whole:
            self.whole = seen

    def take_due(self) -> int:
        """Whole copies beyond the first not registered yet (and mark them registered)."""
        due = max(0, self.whole - self.registered)
        self.registered += due
        return due


class CopyCounts:
    """Counting the copies of generations in flight or settled (see the module)."""

    def count_copy(self, record, n_total: int, chunk_i: int, status: AddStatus) -> None:
        """A new (not re-read) chunk of ``record``'s file: a duplicate begins counting the
        copies produced again. Only chunks that agree with the file's own chunk count
        are counted (a hostile count must not cost one step per claimed chunk)."""
        if status is AddStatus.DUPLICATE and not self.counting(record.key):
            received = record.assembly and list(record.assembly.lead.pieces)
            if received is None:  # completed: every chunk of the first copy was read
                if record.completed is None or record.completed.n_chunks != n_total:
                    return
                received = range(1, n_total + 1)
            self.count_repeat(record.key, n_total, chunk_i, received)
        elif status in (AddStatus.DUPLICATE, AddStatus.ACCEPTED, AddStatus.COMPLETED):
            self.count_repeat(record.key, n_total, chunk_i, None)

    def count_repeat(self, key: FileKey, n_total: int, chunk_i: int,
                     received: list[int] | None) -> None:
        """Count one new (not re-read) chunk of a generation seen before; ``received``
        (the chunks of the first copy read so far) starts the count."""
        counter = self._repeats.get(key)
        if counter is None:
            if received is None:
                return
            counter = self._repeats[key] = RepeatCounter(n_total, received)
        if counter.n_total == n_total:  # a chunk of another chunking is no copy of this one
            counter.add(chunk_i)

    def repeats_due(self, key: FileKey) -> list[CompletedFile]:
        """The settled first copy once per whole copy counted since the last call (only
        once the first copy is settled: before, the copies wait)."""
        first, counter = self._settled.get(key), self._repeats.get(key)
        if first is None or counter is None:
            return []
        return [first] * counter.take_due()

    def counting(self, key: FileKey) -> bool:
        return key in self._repeats
