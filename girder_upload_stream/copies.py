"""Counting copies of a file produced again while its first copy is still on its way.

When a producer sends the same file (same path, same content) a second time before the
consumer has put the first copy in Girder -- a new group reading a topic that holds
both, say -- the chunks of the two copies interleave freely across partitions. Each
copy must be registered (the processed table lists a file once per production), but
the second need not be rebuilt: its content is the first's. So chunk numbers are
counted, and every time each of a file's chunks has been read once more, one more
copy is complete. Re-reads of messages read before (rebalances, restarts) are not
productions and are never counted here.

Pure bookkeeping: no Prefect, Kafka or Girder.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import replace

from girder_upload_stream.codec import FileKey
from girder_upload_stream.reassembly import CompletedFile

__all__ = ["CopyTracker"]


class _Copies:
    def __init__(self, n_total: int, received: Iterable[int]) -> None:
        self.n_total = n_total
        self.count: Counter[int] = Counter(received)
        self.counted = 1  # the first copy is registered by its own upload
        self.due = 0

    def add(self, chunk_i: int) -> None:
        self.count[chunk_i] += 1
        whole = min(self.count.get(i, 0) for i in range(1, self.n_total + 1))
        if whole > self.counted:
            self.due += whole - self.counted
            self.counted = whole


class CopyTracker:
    """Whole copies read per file generation, from the first duplicate chunk on.

    ``start`` begins counting a generation (``received``: chunk numbers of the first
    copy read so far), ``add`` counts a chunk, ``settled`` gives the first copy once it
    is durable, and ``take_due`` returns the copies to register now: only after the
    first copy is settled, each once. At most ``max_settled`` settled files are kept.
    """

    def __init__(self, max_settled: int = 10_000) -> None:
        self._copies: dict[FileKey, _Copies] = {}
        self._settled: OrderedDict[FileKey, CompletedFile] = OrderedDict()
        self._max_settled = max_settled

    def tracking(self, key: FileKey) -> bool:
        """True once a second copy of this generation has begun."""
        return key in self._copies

    def start(self, key: FileKey, n_total: int, received: Iterable[int]) -> None:
        if key not in self._copies:
            self._copies[key] = _Copies(n_total, received)

    def add(self, key: FileKey, chunk_i: int) -> None:
        copies = self._copies.get(key)
        if copies is not None:
            copies.add(chunk_i)

    def settled(self, completed: CompletedFile) -> None:
        """The first copy is in Girder (or found there): later copies may register."""
        key = completed.file_key
        self._settled[key] = replace(completed, data=None)  # never keep file bytes
        self._settled.move_to_end(key)
        while len(self._settled) > self._max_settled:
            old, _ = self._settled.popitem(last=False)
            self._copies.pop(old, None)

    def take_due(self, key: FileKey) -> list[CompletedFile]:
        """The settled first copy once per whole copy counted since the last call."""
        copies, first = self._copies.get(key), self._settled.get(key)
        if copies is None or first is None or not copies.due:
            return []
        due, copies.due = copies.due, 0
        return [first] * due
