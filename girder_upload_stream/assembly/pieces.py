"""A file rebuilt in memory, kept as the chunks it arrived in.

Joining the chunks into one ``bytes`` at completion would hold every file twice for a
moment (the chunks and the join), which is what made memory mode's peak RSS grow by a
whole file per upload worker. :class:`Pieces` keeps the chunk buffers as they are and
:meth:`Pieces.open` gives girder-client a read-only stream over them, so the only copy
is the upload request's own block (girder-client reads at most 64 MiB at a time).
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence

__all__ = ["Pieces", "PiecesReader"]

Buffer = bytes | bytearray | memoryview


class Pieces:
    """The bytes of a file as an ordered sequence of buffers (not copied)."""

    __slots__ = ("_parts", "_ends", "start")
    __hash__ = None  # mutable-looking equality with bytes; never a dict key

    def __init__(self, parts: Sequence[Buffer], start: int = 0) -> None:
        """``start``: the file offset of the first part; the bytes before it are not
        held (let go once a streamed upload sent them), and reading them raises."""
        self._parts = tuple(memoryview(p).cast("B") for p in parts)
        self.start = start
        ends, total = [], start
        for part in self._parts:
            total += len(part)
            ends.append(total)
        self._ends = ends

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else self.start

    def __bytes__(self) -> bytes:
        self._check(0)
        return b"".join(self._parts)

    def _check(self, position: int) -> None:
        if position < self.start:
            raise ValueError(f"bytes before offset {self.start} are not held (sent to "
                             f"Girder and let go), {position} asked")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pieces):
            return bytes(self) == bytes(other)
        if isinstance(other, (bytes, bytearray, memoryview)):
            return len(self) == len(other) and bytes(self) == bytes(other)
        return NotImplemented

    def __repr__(self) -> str:
        held = f", from {self.start}" if self.start else ""
        return f"Pieces({len(self._parts)} part(s), {len(self)} bytes{held})"

    def open(self) -> PiecesReader:
        """A fresh read-only binary stream positioned at the start."""
        return PiecesReader(self)

    def read_at(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` (one copy, however many parts)."""
        end = min(position + size, len(self))
        if position >= end:
            return b""
        self._check(position)
        i = bisect.bisect_right(self._ends, position)
        out = []
        while position < end:
            start = self._ends[i] - len(self._parts[i])
            take = min(end, self._ends[i]) - position
            out.append(self._parts[i][position - start:position - start + take])
            position += take
            i += 1
        return out[0].tobytes() if len(out) == 1 else b"".join(out)


class PiecesReader(io.RawIOBase):
    """A seekable, read-only stream over :class:`Pieces`."""

    def __init__(self, pieces: Pieces) -> None:
        super().__init__()
        self._pieces = pieces
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._pieces)}
        if whence not in base:
            raise ValueError(f"invalid whence {whence}")
        position = base[whence] + offset
        if position < 0:
            raise ValueError("negative seek position")
        self._pos = position
        return position

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        if size is None or size < 0:
            size = max(0, len(self._pieces) - self._pos)
        data = self._pieces.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)
