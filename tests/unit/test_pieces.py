"""The in-memory file as chunks: reads across part boundaries, seeks, equality."""

from __future__ import annotations

import io
import random

import pytest

from girder_upload_stream.assembly.pieces import Pieces


def _parts(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 7, 64, 1000])) for _ in range(40)]


@pytest.mark.parametrize("seed", range(5))
def test_reads_of_any_size_rebuild_the_joined_bytes(seed):
    parts = _parts(seed)
    joined = b"".join(parts)
    pieces = Pieces([memoryview(p) if i % 2 else p for i, p in enumerate(parts)])
    assert len(pieces) == len(joined) and bytes(pieces) == joined and pieces == joined
    rng = random.Random(seed)
    stream, got = pieces.open(), []
    while block := stream.read(rng.choice([1, 3, 64, 999, 5000])):
        got.append(block)
    assert b"".join(got) == joined and stream.tell() == len(joined)
    assert stream.read(10) == b""


def test_seek_and_readinto_follow_io_semantics():
    pieces = Pieces([b"abc", b"", b"defg", b"h"])
    stream = pieces.open()
    assert stream.seek(0, io.SEEK_END) == 8
    stream.seek(2)
    buf = bytearray(4)
    assert stream.readinto(buf) == 4 and bytes(buf) == b"cdef"
    assert stream.seek(-1, io.SEEK_CUR) == 5 and stream.read() == b"fgh"
    with pytest.raises(ValueError):
        stream.seek(-1)
    assert Pieces([]) == b"" and len(Pieces([])) == 0
    assert Pieces([b"ab"]) != b"abc" and Pieces([b"a", b"b"]) == Pieces([b"ab"])


def test_the_parts_are_not_copied():
    part = bytearray(b"0123456789")
    pieces = Pieces([part])
    part[0:1] = b"X"
    assert pieces.read_at(0, 3) == b"X12"
