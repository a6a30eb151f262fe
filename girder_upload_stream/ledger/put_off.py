"""Offsets rule 10 for one partition: the chunks put off at the bound of files in
progress (``--max_files_in_progress``), and the pass that reads the partition again from
the first of them.

A chunk that would begin one more file at the bound is *put off*: it stays pending in the
:class:`~girder_upload_stream.ledger.offsets.OffsetTracker` (so no commit passes it and a
restart reads it again), and is listed here with the file it would begin. Reading goes on
past it, so the files in progress get their chunks and complete. Once a file could take
one (room under the bound, or its own file begun meanwhile), the partition is sought back
to the first put-off chunk; on that pass, the messages this run handled already are
skipped (``high`` is one past the highest offset handled), the put-off ones taken or put
off again.

Pure bookkeeping: no Kafka, no file. The tracker owns one table per partition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable

__all__ = ["PutOffChunks"]


class PutOffChunks:
    """The put-off chunks of one partition and its pass back to them (see the module)."""

    __slots__ = ("offsets", "files", "high", "asked", "replaying")

    def __init__(self) -> None:
        self.offsets: dict[int, Hashable] = {}  # put-off offset -> the file it would begin
        self.files: Counter[Hashable] = Counter()  # files with put-off chunks, how many
        self.high = 0  # one past the highest offset this run handled
        self.asked: int | None = None  # a seek back asked, not done yet
        self.replaying = False  # the consumer went back once: some offsets come again

    def __len__(self) -> int:
        return len(self.offsets)

    def handled(self, offset: int) -> None:
        """A message was handled (taken, done or put off)."""
        self.high = max(self.high, offset + 1)

    def put_off(self, offset: int, file: Hashable) -> bool:
        """The chunk at ``offset`` waits for room; True the first time it is put off."""
        if offset in self.offsets:
            return False
        self.offsets[offset] = file
        self.files[file] += 1
        return True

    def take(self, offset: int) -> bool:
        """The chunk at ``offset`` is taken at last (or was never put off): True if it
        was put off."""
        file = self.offsets.pop(offset, None)
        if file is None:
            return False
        self.files[file] -= 1
        if not self.files[file]:
            del self.files[file]
        return True

    def seen_before(self, offset: int) -> bool:
        """True for a message this run handled already and that is not put off: on a
        pass back, it is skipped (taking it again would take it twice)."""
        return self.replaying and offset < self.high and offset not in self.offsets

    def seek_back(self, at: int, could_take: Callable[[Callable[[Hashable], bool]], bool]
                  ) -> int | None:
        """Where to seek now, if anywhere: the first put-off chunk, once the partition is
        read up to ``high`` (``at``: the next offset to read; no pass under way) and a
        file could take a put-off chunk (``could_take`` gets a test of whether a file
        has put-off chunks here)."""
        if not self.offsets or at < self.high:
            return None
        if not could_take(self.files.__contains__):
            return None
        self.asked = min(self.offsets)
        return self.asked

    def sought(self, offset: int) -> bool:
        """The consumer now reads from ``offset``; True if it was this table's seek back
        (a pass from there begins)."""
        if self.asked is None or self.asked != offset:
            return False
        self.asked, self.replaying = None, True
        return True
