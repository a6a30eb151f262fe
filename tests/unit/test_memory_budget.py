"""Unit tests of the memory budget: files being rebuilt are spilled to their staging
files (Reassembler.spill) when the bytes held pass --memory_budget_mb, and nothing is
lost (the files complete, verified, from disk)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from girder_upload_stream.assembly.reassembly import AddStatus, Mode, Reassembler, Storage
from girder_upload_stream.assembly.safe_disk import STAGING_DIR
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.unit.fakes import Log, content, make_processor, outcomes, scatter


def _chunks(data: bytes, name: str, size: int, rng: random.Random | None = None):
    chunks = list(chunk_file(data, "", size, filename=name))
    if rng is not None:
        rng.shuffle(chunks)
    return chunks


def test_a_spilled_memory_file_completes_from_disk_with_the_right_hashes(tmp_path) -> None:
    rng = random.Random(3)
    data = rng.randbytes(10_000)
    reassembler = Reassembler(Mode.MEMORY, tmp_path / "out")
    chunks = _chunks(data, "big.bin", 100, rng)
    for chunk in chunks[:60]:
        assert reassembler.add(chunk).status is AddStatus.ACCEPTED
    assert reassembler.bytes_held == 6_000
    assert reassembler.spill(1_000) == 1
    assert reassembler.bytes_held == 0 and reassembler.spilled_bytes == 6_000
    staged = list(reassembler.staging_dir.iterdir())
    assert len(staged) == 1 and reassembler.staging_dir.parent.name == STAGING_DIR
    results = [reassembler.add(chunk) for chunk in chunks[60:]]
    assert reassembler.bytes_held == 0  # later chunks go to the disk too
    done = results[-1].completed
    assert results[-1].status is AddStatus.COMPLETED
    assert done.data is None and done.path.parent == reassembler.staging_dir
    assert content(done) == data
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    reassembler.release(done)
    assert list(reassembler.staging_dir.iterdir()) == []
    reassembler.close()


def test_a_spilled_file_with_a_wrong_chunk_still_fails_its_hash(tmp_path) -> None:
    data = bytes(range(256)) * 8
    chunks = _chunks(data, "bad.bin", 256)
    # A consistent but different file under the same file_hash: the sha512 check fails.
    other = _chunks(bytes(reversed(data)), "bad.bin", 256)
    reassembler = Reassembler(Mode.MEMORY, tmp_path / "out")
    reassembler.add(chunks[0])
    reassembler.spill(0)
    results = [reassembler.add(replace(c, file_hash=chunks[0].file_hash))
               for c in other[1:]]
    assert results[-1].status is AddStatus.REJECTED
    assert "mismatched hash" in results[-1].reason
    # Parked (holding no commit) for a later chunk; forgotten, its staging file goes.
    assert len(list(reassembler.staging_dir.iterdir())) == 1
    assert reassembler.discard(chunks[0].file_key)
    assert list(reassembler.staging_dir.iterdir()) == []
    reassembler.close()


def test_both_mode_spills_by_dropping_ram_and_keeps_the_local_copy(tmp_path) -> None:
    data = random.Random(4).randbytes(4_000)
    reassembler = Reassembler(Mode.BOTH, tmp_path / "out")
    chunks = _chunks(data, "copy.bin", 500)
    reassembler.add(chunks[0])
    reassembler.add(chunks[2])
    assert reassembler.spill(0) == 1 and reassembler.bytes_held == 0
    for chunk in chunks[1:2] + chunks[3:]:
        result = reassembler.add(chunk)
    done = result.completed
    assert done.data is None and done.path == (tmp_path / "out" / "copy.bin").resolve()
    assert done.path.read_bytes() == data
    reassembler.release(done)
    assert done.path.exists()  # both mode keeps its local copy
    reassembler.close()


def test_largest_files_spill_first_and_only_down_to_the_target(tmp_path) -> None:
    reassembler = Reassembler(Mode.MEMORY, tmp_path / "out")
    sizes = {"a.bin": 3, "b.bin": 1, "c.bin": 2}  # chunks of 100 bytes held
    for name, n in sizes.items():
        for chunk in _chunks(bytes(100 * (n + 1)), name, 100)[:n]:
            reassembler.add(chunk)
    assert reassembler.bytes_held == 600
    assert reassembler.spill(350) == 1  # a.bin (300 bytes) is enough
    held = {p.rel_path: p.bytes_held for p in reassembler.in_progress()}
    assert held == {"a.bin": 0, "b.bin": 100, "c.bin": 200}
    assert reassembler.spill(600) == 0
    reassembler.close()


def test_without_an_output_dir_nothing_spills_and_nothing_is_lost() -> None:
    reassembler = Reassembler(Mode.MEMORY)
    chunks = _chunks(b"x" * 300, "a.bin", 100)
    reassembler.add(chunks[0])
    assert reassembler.spill(0) == 0 and reassembler.bytes_held == 100
    for chunk in chunks[1:]:
        result = reassembler.add(chunk)
    assert bytes(result.completed.data) == b"x" * 300


def test_the_processor_keeps_files_being_rebuilt_within_the_budget(tmp_path) -> None:
    rng = random.Random(5)
    files = {f"f{i}.bin": rng.randbytes(4_000) for i in range(6)}
    log = Log()
    messages = scatter(log, files, rng, size=200)
    budget = 5_000
    proc = make_processor(Mode.MEMORY, tmp_path / "out", memory_budget_bytes=budget)
    peak = 0
    for msg in messages:
        proc.handle(msg)
        peak = max(peak, proc.bytes_held)
    assert peak <= budget + 200  # at most one chunk over, before it is spilled
    assert proc.reassembler.spilled_files > 0
    units = proc.take_units()
    assert {f.rel_path: content(f) for u in units for f in u.files} == files
    for unit in units:
        proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == log.end() and proc.bytes_held == 0
    assert list(proc.reassembler.staging_dir.iterdir()) == []  # released after upload


def test_a_flood_of_one_chunk_files_claiming_huge_counts_stays_within_the_budget(
        tmp_path) -> None:
    log = Log()
    budget = 64 * 1024
    proc = make_processor(Mode.MEMORY, tmp_path / "out", memory_budget_bytes=budget)
    peak = 0
    for i in range(400):
        # The first chunk of a file claiming 10**9 chunks: it never completes.
        first = next(chunk_file(random.Random(i).randbytes(2048), "", 1024,
                                filename=f"flood{i}.bin"))
        key, value = encode_chunk(replace(first, n_total_chunks=10**9))
        proc.handle(log.put(i % 4, key, value))
        peak = max(peak, proc.bytes_held)
    assert peak <= budget + 1024
    assert len(proc.reassembler.in_progress()) == 400  # nothing lost: all still pending
    assert proc.offsets.pending_count() == 400


def test_poll_size_follows_the_message_size() -> None:
    proc = make_processor(memory_budget_bytes=64 << 20)
    assert proc.poll_size(500) == 500  # nothing read yet
    proc.counters.messages_read, proc.counters.bytes_read = 10, 10 * (512 << 10)
    assert proc.poll_size(500) == 16  # 8 MiB (budget / 8) of 512 KiB messages
    proc.counters.bytes_read = 10 * 100
    assert proc.poll_size(500) == 500


def test_storage_of_each_mode(tmp_path) -> None:
    for mode, storage in ((Mode.MEMORY, Storage.RAM), (Mode.DISK, Storage.DISK),
                          (Mode.BOTH, Storage.RAM_AND_DISK)):
        reassembler = Reassembler(mode, tmp_path / mode.value)
        reassembler.add(_chunks(b"ab" * 100, "s.bin", 50)[0])
        [group] = reassembler._files.values()
        assert group.lead.storage is storage
        reassembler.close()
