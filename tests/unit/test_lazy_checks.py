"""Unit tests of lazy chunk checks (assembly/lazy_checks.py): a chunk's own sha512 is
checked only where an unchecked chunk could decide something, and a chunk found lying
is dropped (and reported) so that the genuine copy still completes the file. The walks:
stored unchecked -> verified by the whole-file sha512 (no chunk hash computed); a
claimed duplicate settles the held chunk (check 1); a streamed upload's read checks
what it sends (check 2); a failed sha512 checks what is held (check 3); and the
processor records each liar's message and does not hold its offset."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path

import pytest

from girder_upload_stream.assembly import lazy_checks
from girder_upload_stream.assembly.hashing import HashPipe
from girder_upload_stream.assembly.lazy_checks import CHUNK_HASH_MISMATCH
from girder_upload_stream.assembly.reassembly import AddStatus, Mode, Reassembler
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.wire.codec import chunk_file, decode_chunk, encode_chunk
from tests.unit.fakes import TOPIC, Clock, Log, SpyRecorder, upload_all

DATA = random.Random(7).randbytes(1_000)


def _chunks(data: bytes = DATA, name: str = "f.bin", size: int = 100):
    return [decode_chunk(encode_chunk(c)[1]) for c in chunk_file(data, "", size, filename=name)]


def _liar(chunk):
    """The chunk with other bytes of its size, its header unchanged (it lies)."""
    return replace(chunk, data=bytes(b ^ 0xFF for b in chunk.data))


def _lazy(mode: Mode = Mode.MEMORY, out: Path | None = None) -> Reassembler:
    # Rewind points at every chunk end, so that tiny chunks behave like real ones.
    return Reassembler(mode, out, lazy_checks=True, hash_pipe=HashPipe(mark_spacing=1))


@pytest.fixture
def chunk_hashes(monkeypatch) -> list[int]:
    """Counts the chunks whose own sha512 is computed."""
    calls: list[int] = []
    real = lazy_checks.chunk_hash_ok

    def counting(data, chunk_hash):
        calls.append(len(data))
        return real(data, chunk_hash)

    monkeypatch.setattr(lazy_checks, "chunk_hash_ok", counting)
    monkeypatch.setattr("girder_upload_stream.assembly.reassembly.chunk_hash_ok", counting)
    return calls


@pytest.mark.parametrize("mode", [Mode.MEMORY, Mode.DISK])
def test_a_genuine_file_completes_without_one_chunk_hash(mode, tmp_path, chunk_hashes) -> None:
    reassembler, chunks = _lazy(mode, tmp_path), _chunks()
    for chunk in reversed(chunks[1:]):
        assert reassembler.add(chunk).status is AddStatus.ACCEPTED
    result = reassembler.add(chunks[0])
    assert result.status is AddStatus.COMPLETED
    assert result.completed.sha256 == hashlib.sha256(DATA).hexdigest()
    assert chunk_hashes == [] and reassembler.take_liars() == []


@pytest.mark.parametrize("mode", [Mode.MEMORY, Mode.DISK])
def test_a_liar_first_does_not_make_the_genuine_copy_a_duplicate(mode, tmp_path) -> None:
    reassembler, chunks = _lazy(mode, tmp_path), _chunks()
    assert reassembler.add(_liar(chunks[3]), tag="liar").status is AddStatus.ACCEPTED
    assert reassembler.add(chunks[3], tag="genuine").status is AddStatus.ACCEPTED
    [liar] = reassembler.take_liars()
    assert (liar.tag, liar.chunk_i, liar.rel_path) == ("liar", 4, "f.bin")
    results = [reassembler.add(c) for c in chunks if c.chunk_i != 4]
    assert results[-1].status is AddStatus.COMPLETED
    done = results[-1].completed
    assert (bytes(done.data) if done.data is not None else done.path.read_bytes()) == DATA


def test_a_lying_copy_of_a_held_chunk_is_refused_alone() -> None:
    reassembler, chunks = _lazy(), _chunks()
    reassembler.add(chunks[2])
    result = reassembler.add(_liar(chunks[2]))
    assert result.status is AddStatus.REFUSED and result.reason == CHUNK_HASH_MISMATCH
    # The held chunk was found genuine on the way: an honest duplicate costs no hash.
    assert reassembler.add(chunks[2]).status is AddStatus.DUPLICATE
    assert [r.status for r in map(reassembler.add, chunks)][-1] is AddStatus.COMPLETED


def test_a_one_chunk_liar_is_refused_and_leaves_nothing_behind() -> None:
    reassembler, [chunk] = _lazy(), _chunks(DATA[:50])
    result = reassembler.add(_liar(chunk), tag="m")
    assert result.status is AddStatus.REFUSED and result.reason == CHUNK_HASH_MISMATCH
    assert reassembler.take_liars() == [] and reassembler.files_in_progress == 0
    assert reassembler.bytes_held == 0
    assert reassembler.add(chunk).status is AddStatus.COMPLETED


@pytest.mark.parametrize("mode", [Mode.MEMORY, Mode.DISK])
def test_a_failed_sha512_drops_the_liars_and_waits_for_good_copies(mode, tmp_path) -> None:
    reassembler, chunks = _lazy(mode, tmp_path), _chunks()
    lying = {2: "two", 7: "seven"}
    for chunk in chunks:
        tag = lying.get(chunk.chunk_i)
        result = reassembler.add(_liar(chunk) if tag else chunk, tag=tag)
    assert result.status is AddStatus.ACCEPTED  # not rejected: the file waits
    assert sorted(liar.tag for liar in reassembler.take_liars()) == ["seven", "two"]
    assert reassembler.received(result.file_key) == [i for i in range(1, 11) if i not in lying]
    assert reassembler.add(chunks[6]).status is AddStatus.ACCEPTED
    result = reassembler.add(chunks[1])
    assert result.status is AddStatus.COMPLETED
    assert result.completed.sha256 == hashlib.sha256(DATA).hexdigest()


def test_a_file_that_fails_with_honest_chunks_is_still_rejected(chunk_hashes) -> None:
    wrong = hashlib.sha512(b"another file").digest()
    reassembler = _lazy()
    results = [reassembler.add(replace(c, file_hash=wrong)) for c in _chunks()]
    assert results[-1].status is AddStatus.REJECTED and "mismatched hash" in results[-1].reason
    assert len(chunk_hashes) == 10 and reassembler.take_liars() == []


def test_a_streamed_read_checks_what_it_sends_and_stops_before_a_liar() -> None:
    reassembler, chunks = _lazy(), _chunks()
    key = (chunks[0].rel_path, chunks[0].file_hash)
    for chunk in chunks[:8]:
        reassembler.add(_liar(chunk) if chunk.chunk_i == 5 else chunk,
                        tag="five" if chunk.chunk_i == 5 else None)
    assert reassembler.read_prefix(key, 0, 300) == DATA[:300]
    assert reassembler.let_go(key, 300) == 300
    assert reassembler.read_prefix(key, 300, 600) is None  # chunk 5 lies
    assert [liar.tag for liar in reassembler.take_liars()] == ["five"]
    assert reassembler.stream_view(key)[1] == 400  # the prefix ends before it
    for chunk in [chunks[4], *chunks[8:]]:
        result = reassembler.add(chunk)
    # The digest went back to the point at 400, not to the bytes let go.
    assert result.status is AddStatus.COMPLETED and result.completed.held_from == 300
    assert bytes(result.completed.data.read_at(300, 700)) == DATA[300:]


def test_let_go_frees_only_checked_chunks_up_to_a_rewind_point() -> None:
    reassembler, chunks = Reassembler(Mode.MEMORY, lazy_checks=True), _chunks()
    key = (chunks[0].rel_path, chunks[0].file_hash)
    for chunk in chunks[:6]:
        reassembler.add(chunk)
    # Points 256 KiB apart: none in 1,000 bytes, so nothing may leave RAM.
    assert reassembler.let_go(key, 500) == 0 and reassembler.bytes_held == 600


def test_the_processor_rejects_a_liars_message_and_does_not_hold_its_offset() -> None:
    recorder = SpyRecorder()
    proc = StreamProcessor(_lazy(), recorder=recorder, clock=Clock())
    log, chunks = Log(), _chunks()
    for chunk in chunks:
        key, value = encode_chunk(_liar(chunk) if chunk.chunk_i == 3 else chunk)
        proc.handle(log.put(0, key, value))
    liar_offset = 2
    assert proc.counters.messages_rejected == 1
    [(_, partition, offset, reason)] = recorder.of("message_rejected")
    assert (partition, offset) == (0, liar_offset) and CHUNK_HASH_MISMATCH in reason
    assert proc.offsets.committable() == {(TOPIC, 0): 0}  # the file is still pending
    proc.handle(log.put(0, *encode_chunk(chunks[2])))
    [unit] = upload_all(proc)
    assert [f.rel_path for f in unit.files] == ["f.bin"]
    assert proc.offsets.committable() == {(TOPIC, 0): 11}


def test_the_processor_drops_a_file_only_liars_began() -> None:
    proc = StreamProcessor(_lazy(), recorder=SpyRecorder(), clock=Clock())
    log, chunks = Log(), _chunks(DATA[:300])
    proc.handle(log.put(0, *encode_chunk(_liar(chunks[0]))))
    proc.handle(log.put(0, *encode_chunk(chunks[1])))
    proc.handle(log.put(0, *encode_chunk(_liar(chunks[2]))))  # completes, fails: 2 liars
    assert proc.counters.messages_rejected == 2
    assert proc.offsets.committable() == {(TOPIC, 0): 1}  # chunk 2 still waits
    for chunk in (chunks[0], chunks[2]):
        proc.handle(log.put(0, *encode_chunk(chunk)))
    upload_all(proc)
    assert proc.offsets.committable() == {(TOPIC, 0): 5}


def test_rewind_points_are_kept_only_while_the_bytes_are_in_ram(tmp_path) -> None:
    on_disk, in_ram = _lazy(Mode.DISK, tmp_path / "disk"), _lazy(Mode.MEMORY, tmp_path / "ram")
    for reassembler in (on_disk, in_ram):
        for chunk in _chunks()[:5]:
            reassembler.add(chunk)
    [disk_state] = on_disk._files.values()
    [ram_state] = in_ram._files.values()
    assert disk_state.lead.digest.mark_positions == []
    assert ram_state.lead.digest.mark_positions == [100, 200, 300, 400, 500]
    assert in_ram.spill(0) == 1
    in_ram.add(_chunks()[5])  # hashed on disk now: no new point
    assert ram_state.lead.digest.mark_positions == [100, 200, 300, 400, 500]
