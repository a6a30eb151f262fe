"""Issue 20 sections 1 and 5, through the consumer's core (StreamProcessor): only the
whole-file sha512 decides a file's fate, never one unverified message; and floods of
partial files are bounded, their excess put off (never committed past, read again once
room frees) while genuine files inside the bound still land."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from girder_upload_stream.assembly.copies import MAX_CHUNKINGS, MAX_EXTRA_VARIANTS
from girder_upload_stream.assembly.reassembly import Mode
from girder_upload_stream.ledger.records import FileState
from girder_upload_stream.wire.codec import Chunk, chunk_file, decode_chunk, encode_chunk
from tests.unit.fakes import TOPIC, Clock, Log, content, make_processor, outcomes
from tests.unit.test_streaming import Opener

MODES = [Mode.MEMORY, Mode.DISK, Mode.BOTH]
DATA = random.Random(20).randbytes(100)


def chunks(data: bytes = DATA, size: int = 10, name: str = "f.bin") -> list[Chunk]:
    return [decode_chunk(encode_chunk(c)[1]) for c in chunk_file(data, "", size, filename=name)]


def forge(chunk: Chunk, data: bytes | None = None) -> Chunk:
    """The same chunk (name, file hash, number, offset) with other bytes."""
    data = bytes(b ^ 0xA5 for b in chunk.data) if data is None else data
    return replace(chunk, data=data, chunk_hash=hashlib.sha512(data).digest())


def put(log: Log, partition: int, chunk: Chunk):
    return log.put(partition, *encode_chunk(chunk))


def processor(mode: Mode, tmp_path, **kwargs):
    return make_processor(mode, tmp_path / "out" if mode is not Mode.MEMORY else None,
                          **kwargs)


def landed(proc) -> dict[str, bytes]:
    """Upload what is ready; the files that reached Girder, with their bytes."""
    files = {}
    for unit in proc.take_units():
        files.update({f.rel_path: content(f) for f in unit.files})
        proc.finish_unit(unit, outcomes(unit))
    return files


@pytest.mark.parametrize("mode", MODES)
def test_a_forged_chunk_before_the_genuine_file_does_not_veto_it(mode, tmp_path) -> None:
    log, proc = Log(), processor(mode, tmp_path)
    genuine = chunks()
    proc.handle(put(log, 0, forge(genuine[3])))  # same name, hash, index, offset
    for i, chunk in enumerate(genuine):
        proc.handle(put(log, i % 4, chunk))
    assert proc.recorder.of("file_rejected") == []
    assert landed(proc) == {"f.bin": DATA}
    assert proc.offsets.pending_count() == 0  # the forged message is done with its file
    assert proc.offsets.committable()[(TOPIC, 0)] == log.next[(TOPIC, 0)]


@pytest.mark.parametrize("mode", MODES)
def test_forged_chunks_among_the_genuine_ones_in_any_order(mode, tmp_path) -> None:
    rng = random.Random(7)
    genuine = chunks()
    for trial in range(5):
        log, proc = Log(), processor(mode, tmp_path / str(trial))
        messages = genuine + [forge(genuine[i]) for i in rng.sample(range(10), 3)]
        rng.shuffle(messages)
        for chunk in messages:
            proc.handle(put(log, rng.randrange(4), chunk))
        assert landed(proc) == {"f.bin": DATA}, trial
        assert proc.offsets.pending_count() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_second_chunking_before_the_genuine_file_does_not_veto_it(mode, tmp_path) -> None:
    log, proc = Log(), processor(mode, tmp_path)
    other = chunks(size=30)  # 4 chunks, against 10
    for chunk in other[:2]:  # half of the file sent again with another chunk size...
        proc.handle(put(log, 1, chunk))
    proc.handle(put(log, 2, forge(chunks()[0])))  # ...and a forged chunk
    for i, chunk in enumerate(chunks()):
        proc.handle(put(log, i % 4, chunk))
    assert landed(proc) == {"f.bin": DATA}
    assert proc.recorder.of("file_rejected") == []
    for chunk in other[2:]:  # the rest of the second chunking: duplicates of a done file
        proc.handle(put(log, 3, chunk))
    assert proc.offsets.pending_count() == 0 and landed(proc) == {}


@pytest.mark.parametrize("mode", MODES)
def test_either_chunking_completes_the_file_whichever_finishes_first(mode, tmp_path) -> None:
    log, proc = Log(), processor(mode, tmp_path)
    first, second = chunks(size=10), chunks(size=7)
    for chunk in first[:5] + second + first[5:]:
        proc.handle(put(log, 0, chunk))
    [done] = [c for c in proc.ledger.in_state(FileState.READY)]
    assert done.completed.n_chunks == len(second)
    assert landed(proc) == {"f.bin": DATA} and proc.offsets.pending_count() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_copy_then_a_clean_copy_lands(mode, tmp_path) -> None:
    log, proc = Log(), processor(mode, tmp_path)
    genuine = chunks()
    bad = genuine[:4] + [forge(genuine[4])] + genuine[5:]
    for chunk in bad:
        proc.handle(put(log, 0, chunk))
    [(_, _, reason)] = proc.recorder.of("file_rejected")
    assert "mismatched hash" in reason and "read again by the next run" in reason
    assert proc.offsets.committable() == {(TOPIC, 0): 10}  # registered, retried next run
    assert proc.offsets.failed_spans((TOPIC, 0), 10) == [(0, 10)]
    for chunk in genuine:  # the clean copy is not ignored
        proc.handle(put(log, 1, chunk))
    assert landed(proc) == {"f.bin": DATA}
    assert proc.offsets.committable()[(TOPIC, 1)] == 10


@pytest.mark.parametrize("mode", MODES)
def test_a_genuine_chunk_read_after_a_failed_copy_used_the_others_completes_it(
        mode, tmp_path) -> None:
    """Across partitions: the failed copy took the genuine chunks of the other numbers;
    the genuine chunk of the number it forged comes last, from another partition."""
    log, proc = Log(), processor(mode, tmp_path)
    genuine = chunks()
    for chunk in [forge(genuine[6])] + genuine[:6] + genuine[7:]:
        proc.handle(put(log, 0, chunk))
    assert len(proc.recorder.of("file_rejected")) == 1
    proc.handle(put(log, 1, genuine[6]))
    assert landed(proc) == {"f.bin": DATA}
    assert proc.offsets.pending_count() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_clean_copy_then_a_failed_copy_changes_nothing(mode, tmp_path) -> None:
    log, proc = Log(), processor(mode, tmp_path)
    genuine = chunks()
    for chunk in genuine:
        proc.handle(put(log, 0, chunk))
    for chunk in [forge(c) for c in genuine]:
        proc.handle(put(log, 1, chunk))
    assert landed(proc) == {"f.bin": DATA}
    assert proc.recorder.of("file_rejected") == [] and proc.offsets.pending_count() == 0


def test_competing_copies_abandon_a_streamed_upload(tmp_path) -> None:
    log, opener = Log(), Opener()
    proc = make_processor(Mode.MEMORY, None, open_stream=opener, stream_min_bytes=50)
    genuine = chunks()
    for chunk in genuine[:3] + genuine[9:]:
        proc.handle(put(log, 0, chunk))
    [session] = opener.sessions
    proc.handle(put(log, 0, forge(genuine[1])))  # the streamed prefix is in doubt
    assert session.abandoned
    for chunk in genuine[3:9]:
        proc.handle(put(log, 0, chunk))
    assert len(opener.sessions) == 1  # not opened again
    assert landed(proc) == {"f.bin": DATA}


def test_the_bounds_on_competing_copies_refuse_the_excess_alone(tmp_path) -> None:
    log, proc = Log(), make_processor()
    genuine = chunks()
    for size in (12, 15, 20, 25, 50)[:MAX_CHUNKINGS]:  # other chunk counts, first chunk only
        proc.handle(put(log, 0, chunks(size=size)[0]))
    proc.handle(put(log, 0, genuine[0]))  # one chunking too many: refused
    [(_, _, offset, reason)] = proc.recorder.of("message_rejected")
    assert offset == MAX_CHUNKINGS and "too many chunkings" in reason
    proc2 = make_processor()
    for n in range(MAX_EXTRA_VARIANTS + 3):  # other bytes for chunk 1, again and again
        proc2.handle(put(log, 1, forge(genuine[0], n.to_bytes(10, "big"))))
    rejected = proc2.recorder.of("message_rejected")
    assert [r[2] for r in rejected] == [MAX_EXTRA_VARIANTS + 1, MAX_EXTRA_VARIANTS + 2]
    assert all("too many competing copies" in r[3] for r in rejected)
    assert proc2.offsets.pending_count() == MAX_EXTRA_VARIANTS + 1  # the file goes on
    assert proc2.reassembler.bytes_held == 10 * (MAX_EXTRA_VARIANTS + 1)


# ----------------------------------------------------------------- section 5: floods

def _flood(proc, log, n_files: int, partition: int = 0) -> None:
    """The first chunk of each of ``n_files`` files of two chunks (never completed)."""
    for n in range(n_files):
        [first, _] = chunks(random.Random(n).randbytes(16), 8, f"flood{partition}-{n}.bin")
        proc.handle(put(log, partition, first))


@pytest.mark.parametrize("mode", MODES)
def test_beyond_max_files_in_progress_chunks_wait_and_hold_the_commit(mode, tmp_path) -> None:
    """Back-pressure, not loss (offsets rule 10): the excess is put off, neither
    rejected nor committed past, and no seek back is asked while no file could take it."""
    log = Log()
    proc = processor(mode, tmp_path, max_files_in_progress=20)
    _flood(proc, log, 200)
    assert proc.reassembler.files_in_progress == 20
    assert proc.recorder.of("message_rejected") == []
    assert proc.offsets.put_off_count() == 180 and proc.counters.messages_put_off == 180
    if mode is not Mode.MEMORY:
        assert len(list(proc.reassembler.staging_dir.iterdir())) == 20
    # On another partition too, the commit stops at the first chunk put off.
    _flood(proc, log, 50, partition=1)
    assert proc.offsets.committable() == {(TOPIC, 0): 0, (TOPIC, 1): 0}
    assert proc.offsets.take_seeks() == {}  # no room: reading them again would not help


@pytest.mark.parametrize("mode", MODES)
def test_a_genuine_file_inside_the_bound_lands_during_a_flood(mode, tmp_path) -> None:
    log = Log()
    proc = processor(mode, tmp_path, max_files_in_progress=20)
    genuine = chunks()
    proc.handle(put(log, 1, genuine[0]))  # begun inside the bound
    _flood(proc, log, 200)
    for chunk in genuine[1:]:  # its other chunks are not new files: never refused
        proc.handle(put(log, 1, chunk))
    assert landed(proc) == {"f.bin": DATA}
    assert proc.offsets.committable()[(TOPIC, 1)] == 10
    _flood(proc, log, 1, partition=2)  # its place is free again: one more file is taken
    assert proc.reassembler.files_in_progress == 20


def test_stale_files_make_room_for_new_ones_at_the_bound(tmp_path) -> None:
    log, wall = Log(), Clock(step=0.0)
    proc = make_processor(max_files_in_progress=5, stale_partial_seconds=60.0,
                          wall_clock=wall)
    proc.reassembler._clock = wall
    _flood(proc, log, 5)
    wall.now += 61.0
    proc.expire_stale()  # released: their messages no longer hold the commit
    assert proc.offsets.committable() == {(TOPIC, 0): 5}
    assert len(proc.ledger.in_state(FileState.RELEASED)) == 5
    for chunk in chunks():  # a new file at the bound: the oldest stale one makes room
        proc.handle(put(log, 1, chunk))
    assert proc.recorder.of("message_rejected") == []
    assert landed(proc) == {"f.bin": DATA}
    assert proc.reassembler.files_in_progress == 4
