"""Unit tests of letting go of streamed bytes (issue 22 §3): the reassembler frees the
chunks Girder acknowledged (Reassembler.let_go), the completed file then holds only the
rest (CompletedFile.held_from, Pieces.start), a failed sha512 rejects the file at once
for the next run, and over the memory budget the bytes open streams are about to send
are not spilled (the loop pauses while they leave)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.assembly.reassembly import AddStatus, Mode, Reassembler
from girder_upload_stream.ledger.records import FileState
from girder_upload_stream.wire.codec import chunk_file, decode_chunk, encode_chunk
from tests.unit.fakes import Log, make_processor

DATA = random.Random(22).randbytes(1_000)


def _chunks(data: bytes = DATA, name: str = "big.bin"):
    return [decode_chunk(encode_chunk(c)[1]) for c in chunk_file(data, "", 100, filename=name)]


def _key(chunks) -> tuple[str, bytes]:
    return chunks[0].rel_path, chunks[0].file_hash


def test_pieces_from_an_offset_read_only_what_they_hold() -> None:
    pieces = Pieces([b"abc", b"def"], start=10)
    assert len(pieces) == 16 and pieces.read_at(11, 4) == b"bcde"
    with pytest.raises(ValueError, match="not held"):
        pieces.read_at(9, 2)
    with pytest.raises(ValueError):
        bytes(pieces)
    reader = pieces.open()
    reader.seek(13)
    assert reader.read() == b"def"


def test_let_go_frees_the_acknowledged_prefix_and_the_completed_file_holds_the_rest() -> None:
    reassembler, chunks = Reassembler(Mode.MEMORY), _chunks()
    key = _key(chunks)
    for chunk in chunks[:6]:
        reassembler.add(chunk)
    assert reassembler.bytes_held == 600
    assert reassembler.ram_below(key, 450) == 400
    assert reassembler.let_go(key, 350) == 300  # chunks 1-3 end at 300; chunk 4 at 400
    assert reassembler.bytes_held == 300 and reassembler.ram_below(key, 450) == 100
    assert reassembler.read_prefix(key, 0, 100) is None  # gone, never wrong bytes
    assert reassembler.read_prefix(key, 300, 500) == DATA[300:500]
    assert reassembler.let_go(key, 350) == 0  # twice: nothing more
    results = [reassembler.add(chunk) for chunk in chunks[6:]]
    done = results[-1].completed
    assert results[-1].status is AddStatus.COMPLETED and done.held_from == 300
    assert done.size == 1_000 and len(done.data) == 1_000
    assert done.data.read_at(300, 700) == DATA[300:]
    with pytest.raises(ValueError):
        done.data.read_at(0, 10)
    assert done.sha256 == hashlib.sha256(DATA).hexdigest()


def test_a_mismatch_after_let_go_rejects_the_file_for_the_next_run_without_parking() -> None:
    wrong = hashlib.sha512(b"another file").digest()
    chunks = [replace(c, file_hash=wrong) for c in _chunks()]
    reassembler, key = Reassembler(Mode.MEMORY), _key(chunks)
    for chunk in chunks[:5]:
        reassembler.add(chunk)
    assert reassembler.let_go(key, 200) == 200
    result = [reassembler.add(chunk) for chunk in chunks[5:]][-1]
    assert result.status is AddStatus.REJECTED and result.rejected.retry
    assert "let go" in result.reason and reassembler.bytes_held == 0
    assert reassembler.files_in_progress == 0
    # Not parked, not remembered: a copy read again starts afresh.
    assert reassembler.add(chunks[0]).status is AddStatus.ACCEPTED


def test_only_an_uncontested_file_in_ram_lets_go(tmp_path) -> None:
    chunks = _chunks()
    disk = Reassembler(Mode.DISK, tmp_path / "out")
    for chunk in chunks[:5]:
        disk.add(chunk)
    assert disk.let_go(_key(chunks), 500) == 0 and disk.ram_below(_key(chunks), 500) == 0
    memory = Reassembler(Mode.MEMORY)
    for chunk in chunks[:5]:
        memory.add(chunk)
    other = replace(chunks[2], data=b"x" * 100, chunk_hash=hashlib.sha512(b"x" * 100).digest())
    memory.add(other)  # a competing copy of chunk 3: no prefix is known to be the file's
    assert memory.let_go(_key(chunks), 500) == 0


def test_spill_takes_the_files_streams_are_sending_last(tmp_path) -> None:
    reassembler = Reassembler(Mode.MEMORY, output_dir=tmp_path / "out")
    big, small = _chunks(name="a.bin"), _chunks(DATA[:500], name="b.bin")
    for chunk in big[:8] + small[:3]:
        reassembler.add(chunk)
    assert reassembler.spill(800, last=frozenset({_key(big)})) == 1
    assert reassembler.bytes_held == 800  # b.bin went to disk, a.bin stayed
    assert reassembler.let_go(_key(big), 800) == 800


class DrainingSession:
    """A stream that will send ``end`` bytes without another message."""

    def __init__(self, plan) -> None:
        self.plan, self.end = plan, 0

    def drains_to(self) -> int:
        return self.end

    def nudge(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def test_over_the_budget_bytes_a_stream_is_sending_pause_instead_of_spilling(tmp_path) -> None:
    sessions: list[DrainingSession] = []

    def opener(plan) -> DrainingSession:
        sessions.append(DrainingSession(plan))
        return sessions[-1]

    log = Log()
    proc = make_processor(Mode.MEMORY, tmp_path / "out", open_stream=opener,
                          stream_min_bytes=500, memory_budget_bytes=650)
    chunks = list(chunk_file(DATA, "", 100, filename="big.bin"))
    messages = [log.put(0, *encode_chunk(chunks[i])) for i in [9, 0, 1, 2, 3, 4, 5]]
    for msg in messages[:6]:
        proc.handle(msg)
    [session] = sessions
    assert proc.ledger.in_state(FileState.STREAMING) and proc.idle
    session.end = 500  # the stream can send 500 bytes: holding 700, 200 not draining
    proc.handle(messages[6])
    assert proc.reassembler.spilled_files == 0 and proc.reassembler.bytes_held == 700
    assert not proc.idle  # the loop pauses while they leave
    session.end = 0  # the stream broke: nothing leaves by waiting, so it spills
    proc.handle(log.put(0, *encode_chunk(chunks[6])))
    assert proc.reassembler.spilled_files == 1 and proc.idle
