"""Unit tests for girder_upload_stream.assembly.reassembly (all three modes, hostile inputs)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from girder_upload_stream.assembly import safe_disk as safe_disk_module
from girder_upload_stream.wire.codec import Chunk, chunk_file, decode_chunk, encode_chunk
from girder_upload_stream.errors import ChunkDecodeError, FileRejectedError, StorageError
from girder_upload_stream.assembly.reassembly import STAGING_DIR, AddStatus, Mode, Reassembler

MODES = [Mode.MEMORY, Mode.DISK, Mode.BOTH]


def chunks_of(data: bytes, name: str = "f.bin", subdir: str = "", size: int = 4,
              append: str = "") -> list[Chunk]:
    """Chunks as a producer would cut them (data copied to bytes, as after decoding)."""
    return [decode_chunk(encode_chunk(c)[1])
            for c in chunk_file(data, subdir, size, filename=name, filename_append=append)]


def forged(data: bytes, offset: int, i: int, n: int, file_data: bytes = b"",
           name: str = "f.bin", subdir: str = "") -> Chunk:
    """A chunk with a valid chunk hash but arbitrary placement (bypasses chunk_file)."""
    return Chunk(name, hashlib.sha512(file_data or data).digest(),
                 hashlib.sha512(data).digest(), offset, i, n, subdir, "", data)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def user_files(root: Path) -> set[str]:
    """What a rebuilt tree shows below ``root``: everything but the staging folder."""
    return {p for p in files_under(root) if p.split("/")[0] != STAGING_DIR}


def staged(reassembler: Reassembler) -> set[str]:
    """The files in the reassembler's staging folder (disk and both modes)."""
    return {p.name for p in reassembler.staging_dir.iterdir()}


@pytest.fixture
def sandbox(tmp_path):
    """An output dir plus a sibling 'outside' dir that must never change."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"keep")
    yield out, outside
    assert files_under(outside) == {"sentinel"}
    assert (outside / "sentinel").read_bytes() == b"keep"
    stray = [p for p in files_under(tmp_path)
             if p.split("/")[0] not in ("out", "outside")]
    assert stray == []


def feed(reassembler: Reassembler, chunks: list[Chunk]) -> list:
    return [reassembler.add(c) for c in chunks]


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("mode", MODES)
def test_in_order_file_completes_in_every_mode(sandbox, mode):
    out, _ = sandbox
    data = random.Random(3).randbytes(1001)
    reassembler = Reassembler(mode, out, 10_000)
    results = feed(reassembler, chunks_of(data, "x.bin", "a/b", 100))
    assert [r.status for r in results] == [AddStatus.ACCEPTED] * 10 + [AddStatus.COMPLETED]
    done = results[-1].completed
    assert (done.rel_path, done.size, done.n_chunks) == ("a/b/x.bin", 1001, 11)
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    assert done.file_hash_hex == hashlib.sha512(data).hexdigest()
    assert (done.data == data) if mode is not Mode.DISK else done.data is None
    if mode is Mode.MEMORY:
        assert done.path is None and not out.exists()
    elif mode is Mode.DISK:  # uploaded from the verified staging file, nothing else written
        assert done.path.parent == reassembler.staging_dir
        assert done.path.read_bytes() == data
        assert user_files(out) == set()
        reassembler.release(done)
        assert staged(reassembler) == set()
    else:  # both: the staging file became the local copy
        assert done.path == out.resolve() / "a" / "b" / "x.bin"
        assert done.path.read_bytes() == data
        assert user_files(out) == {"a", "a/b", "a/b/x.bin"}
        assert staged(reassembler) == set()
        reassembler.release(done)  # keeps the local copy
        assert done.path.read_bytes() == data
    assert reassembler.bytes_held == 0 and reassembler.in_progress() == []


def test_filename_append_names_the_rebuilt_file(sandbox):
    out, _ = sandbox
    reassembler = Reassembler("both", out)
    results = feed(reassembler, chunks_of(b"abcdef", "scan.tar.gz", "d", 4, "_v2"))
    assert results[-1].completed.rel_path == "d/scan.tar_v2.gz"
    assert (out / "d" / "scan.tar_v2.gz").read_bytes() == b"abcdef"


def test_progress_duplicates_times_and_memory_accounting():
    times = iter(range(100, 200))
    reassembler = Reassembler("memory", clock=lambda: float(next(times)))
    chunks = chunks_of(b"0123456789", size=3)  # 4 chunks
    assert reassembler.add(chunks[2]).status is AddStatus.ACCEPTED
    assert reassembler.add(chunks[0]).status is AddStatus.ACCEPTED
    duplicate = reassembler.add(chunks[0])
    assert duplicate.status is AddStatus.DUPLICATE and "already received" in duplicate.reason
    [progress] = reassembler.in_progress()
    assert (progress.rel_path, progress.n_received, progress.n_total) == ("f.bin", 2, 4)
    assert (progress.bytes_received, progress.bytes_held) == (6, 6)
    assert (progress.first_message_at, progress.last_message_at) == (100.0, 102.0)
    assert reassembler.bytes_held == 6
    feed(reassembler, [chunks[1]])
    done = reassembler.add(chunks[3]).completed
    assert (done.first_message_at, done.last_message_at) == (100.0, 104.0)
    assert reassembler.bytes_held == 0
    late = reassembler.add(chunks[1])
    assert late.status is AddStatus.DUPLICATE and late.reason == "file already completed"


@pytest.mark.parametrize("mode", MODES)
def test_two_generations_of_one_path_assemble_side_by_side(sandbox, mode):
    out, _ = sandbox
    old, new = b"old content!" * 3, b"new"
    reassembler = Reassembler(mode, out)
    old_chunks, new_chunks = chunks_of(old, size=5), chunks_of(new, size=2)
    results = feed(reassembler, [old_chunks[0], new_chunks[1], old_chunks[1], new_chunks[0]])
    assert results[-1].status is AddStatus.COMPLETED
    assert len(reassembler.in_progress()) == 1
    first = results[-1].completed
    results = feed(reassembler, old_chunks[2:])
    second = results[-1].completed
    assert second.sha256 == hashlib.sha256(old).hexdigest()
    if mode is Mode.BOTH:
        assert (out / "f.bin").read_bytes() == old  # the last completed wins on disk
        assert user_files(out) == {"f.bin"}
    if mode is Mode.DISK:  # each generation keeps its own verified bytes until released
        assert (first.path.read_bytes(), second.path.read_bytes()) == (new, old)
        assert user_files(out) == set() and len(staged(reassembler)) == 2


def test_same_content_rechunked_after_completion_is_a_duplicate():
    reassembler = Reassembler("memory")
    assert feed(reassembler, chunks_of(b"abcdef", size=6))[-1].completed.size == 6
    again = reassembler.add(chunks_of(b"abcdef", size=2)[0])
    assert again.status is AddStatus.DUPLICATE and again.reason == "file already completed"


def test_discard_forgets_a_file_and_its_partial(sandbox):
    out, _ = sandbox
    reassembler = Reassembler("both", out)
    chunks = chunks_of(b"abcdefgh", "g.bin", "sub", 3)
    reassembler.add(chunks[0])
    assert reassembler.bytes_held == 3
    assert any(p.endswith(".partial") for p in files_under(out))
    assert reassembler.discard(chunks[0].file_key) is True
    assert reassembler.discard(chunks[0].file_key) is False
    assert reassembler.bytes_held == 0 and reassembler.in_progress() == []
    assert user_files(out) == set() and staged(reassembler) == set()
    assert feed(reassembler, chunks)[-1].status is AddStatus.COMPLETED


def test_disk_mode_holds_no_chunk_data_in_memory(sandbox):
    out, _ = sandbox
    reassembler = Reassembler("disk", out)
    chunks = chunks_of(bytes(range(200)), size=10)
    feed(reassembler, chunks[5:])
    assert reassembler.bytes_held == 0
    assert reassembler.in_progress()[0].bytes_received == 150
    assert feed(reassembler, chunks[:5])[-1].completed.path.read_bytes() == bytes(range(200))


def test_memory_mode_needs_no_output_dir_and_others_do():
    assert Reassembler("memory").output_dir is None
    with pytest.raises(ValueError):
        Reassembler("disk")
    with pytest.raises(ValueError):
        Reassembler("sideways", "/tmp")


# ---------------------------------------------------------------- property test

_file_specs = st.lists(
    st.tuples(st.binary(min_size=1, max_size=300), st.integers(1, 64)),
    min_size=1, max_size=5)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=_file_specs, same_path=st.booleans(), seed=st.integers(0, 2**32),
       mode=st.sampled_from(MODES))
def test_any_order_interleaving_and_duplication_rebuilds_every_file(specs, same_path, seed,
                                                                    mode):
    rng = random.Random(seed)
    expected: dict[tuple[str, bytes], bytes] = {}
    stream: list[Chunk] = []
    sizes: dict[bytes, int] = {}
    for index, (data, size) in enumerate(specs):
        name = "same.bin" if same_path else f"file{index}.bin"
        # one chunking per content: re-chunking identical content differently within one
        # generation is refused on purpose (see the n_total_chunks test)
        size = sizes.setdefault(data, size)
        chunks = chunks_of(data, name, "d/e" if index % 2 else "", size)
        expected.setdefault(chunks[0].file_key, data)
        stream += chunks + rng.sample(chunks, rng.randint(0, len(chunks)))
    rng.shuffle(stream)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        reassembler = Reassembler(mode, out, 10_000)
        completed = [r.completed for r in feed(reassembler, stream) if r.completed]
        assert sorted(c.rel_path for c in completed) == sorted(k[0] for k in expected)
        for done in completed:
            data = expected[(done.rel_path, done.file_hash)]
            assert (done.size, done.sha256) == (len(data), hashlib.sha256(data).hexdigest())
            if mode is not Mode.DISK:
                assert done.data == data
            if mode is Mode.DISK or (mode is Mode.BOTH and not same_path):
                assert done.path.read_bytes() == data
        assert reassembler.bytes_held == 0 and reassembler.in_progress() == []
        if mode is Mode.DISK:  # the completed files, until released
            assert len(staged(reassembler)) == len(completed)
            for done in completed:
                reassembler.release(done)
        if mode is not Mode.MEMORY:
            assert staged(reassembler) == set()


# ---------------------------------------------------------------- hostile files


def rejected(result, fragment: str) -> None:
    assert result.status is AddStatus.REJECTED, result
    assert fragment in result.reason
    assert result.rejected.reason == result.reason
    error = result.rejected.to_error()
    assert isinstance(error, FileRejectedError) and error.rel_path == result.rejected.rel_path
    assert result.reason in str(error)


@pytest.mark.parametrize("mode", MODES)
def test_mismatched_file_hash_is_rejected_cleaned_up_and_not_remembered(sandbox, mode):
    """A copy whose bytes fail the sha512 is rejected, and only it: the same key
    assembles afresh afterwards, and a clean copy completes."""
    out, _ = sandbox
    reassembler = Reassembler(mode, out)
    good = b"abcdefgh"
    chunks = [forged(good[:4], 0, 1, 2, b"other"), forged(good[4:], 4, 2, 2, b"other")]
    results = feed(reassembler, chunks)
    rejected(results[-1], "mismatched hash")
    assert results[-1].rejected.retry  # its messages are read again by the next run
    assert reassembler.in_progress() == []
    # Parked, holding no commit: its chunks wait for a later one (bounded, see .copies).
    assert reassembler.bytes_held == (0 if mode is Mode.DISK else 8)
    if mode is not Mode.MEMORY:
        assert user_files(out) == set() and len(staged(reassembler)) == 1
    assert reassembler.add(chunks[0]).status is AddStatus.DUPLICATE  # nothing new
    clean = [forged(b"othe", 0, 1, 2, b"other"), forged(b"r", 4, 2, 2, b"other")]
    done = feed(reassembler, clean)[-1]
    assert done.status is AddStatus.COMPLETED and done.contested
    completed = done.completed
    held = completed.data if completed.data is not None else completed.path.read_bytes()
    assert bytes(held) == b"other" and completed.sha256 == hashlib.sha256(b"other").hexdigest()
    assert reassembler.bytes_held == 0
    if mode is Mode.DISK:
        assert staged(reassembler) == {completed.path.name}
    # A rejection is not remembered: once forgotten, the key assembles afresh.
    reassembler.discard(done.file_key)
    assert reassembler.add(chunks[0]).status is AddStatus.ACCEPTED


@pytest.mark.parametrize("mode", MODES)
def test_a_second_chunking_of_one_generation_does_not_veto_the_first(sandbox, mode):
    out, _ = sandbox
    reassembler = Reassembler(mode, out)
    data = b"abcdefgh"
    assert reassembler.add(forged(data[:4], 0, 1, 2, data)).status is AddStatus.ACCEPTED
    second = reassembler.add(forged(data[4:6], 4, 2, 3, data))
    assert second.status is AddStatus.ACCEPTED and second.contested
    done = reassembler.add(forged(data[4:], 4, 2, 2, data))
    assert done.status is AddStatus.COMPLETED and done.completed.n_chunks == 2
    assert done.completed.size == 8 and reassembler.in_progress() == []
    if mode is not Mode.MEMORY:
        assert staged(reassembler) <= {done.completed.path.name}
    assert reassembler.add(forged(data[6:], 6, 3, 3, data)).status is AddStatus.DUPLICATE


@pytest.mark.parametrize(("first", "second"), [
    # (data, offset, i) of two chunks of one 3-chunk file of 12 bytes
    ((b"abcd", 0, 1), (b"cdef", 2, 2)),
    ((b"cdef", 2, 2), (b"abcd", 0, 1)),
    ((b"abcd", 0, 1), (b"ghij", 6, 2)),
    ((b"ghij", 6, 2), (b"abcd", 0, 1)),
    ((b"abcd", 0, 1), (b"efgh", 4, 1)),
    ((b"ijkl", 8, 3), (b"efgh", 9, 2)),
    ((b"efgh", 9, 2), (b"ijkl", 8, 3)),
    ((b"abcd", 0, 1), (b"x", 2, 3)),
    ((b"ef", 4, 2), (b"xy", 5, 3)),
])
@pytest.mark.parametrize("mode", MODES)
def test_overlaps_holes_and_exceeding_offsets_compete_and_the_genuine_file_wins(
        sandbox, first, second, mode):
    """A chunk that contradicts the chunks present (an overlap, a hole, past the end,
    other bytes for a number) is kept as a competing variant, not a veto: the genuine
    chunks, whatever came first, complete the file."""
    out, _ = sandbox
    reassembler = Reassembler(mode, out)
    file_data = b"abcdefghijkl"
    assert reassembler.add(forged(*first, 3, file_data)).status is AddStatus.ACCEPTED
    contested = reassembler.add(forged(*second, 3, file_data))
    assert contested.status in (AddStatus.ACCEPTED, AddStatus.DUPLICATE)
    results = feed(reassembler, chunks_of(file_data, size=4))
    [completed] = [r.completed for r in results if r.status is AddStatus.COMPLETED]
    held = completed.data if completed.data is not None else completed.path.read_bytes()
    assert bytes(held) == file_data and completed.sha256 == hashlib.sha256(file_data).hexdigest()
    if mode is Mode.BOTH:
        assert (out / "f.bin").read_bytes() == file_data
    assert reassembler.bytes_held == 0 and reassembler.in_progress() == []


def test_chunks_that_cannot_fit_between_far_neighbours_compete():
    reassembler = Reassembler("memory")
    file_data = b"x" * 4 + b"abcdef"
    reassembler.add(forged(b"x" * 4, 0, 1, 5, file_data))
    # chunks 2 and 3 need at least 2 bytes between the end of chunk 1 and chunk 4
    far = reassembler.add(forged(b"x", 5, 4, 5, file_data))
    assert far.status is AddStatus.ACCEPTED and far.contested
    done = feed(reassembler, [forged(d, o, i, 5, file_data) for d, o, i in
                              [(b"ab", 4, 2), (b"cd", 6, 3), (b"e", 8, 4), (b"f", 9, 5)]])
    assert done[-1].status is AddStatus.COMPLETED and bytes(done[-1].completed.data) == file_data


@pytest.mark.parametrize("mode", MODES)
def test_chunks_over_the_size_limit_are_refused_alone(sandbox, mode):
    """A chunk that cannot belong to a file under the limit is refused on its own,
    before or beside a file in progress: it never rejects (or vetoes) the file."""
    out, _ = sandbox
    reassembler = Reassembler(mode, out, max_file_bytes=10)
    chunks = chunks_of(b"y" * 12, size=4)
    first = reassembler.add(chunks[2])
    assert first.status is AddStatus.REFUSED and "file too large" in first.reason
    assert reassembler.in_progress() == [] and reassembler.bytes_held == 0
    assert reassembler.add(chunks[0]).status is AddStatus.ACCEPTED
    refused = reassembler.add(chunks[2])
    assert refused.status is AddStatus.REFUSED and "file too large" in refused.reason
    refused = reassembler.add(forged(b"z", 0, 1, 11, b"y" * 12))
    assert refused.status is AddStatus.REFUSED and "11 chunks exceed" in refused.reason
    assert [p.n_received for p in reassembler.in_progress()] == [1]
    assert reassembler.discard(chunks[0].file_key) and reassembler.bytes_held == 0
    if mode is not Mode.MEMORY:
        assert user_files(out) == set() and staged(reassembler) == set()


@pytest.mark.parametrize(("name", "subdir"), [
    ("passwd", "/etc"), ("x", "../outside"), ("x", "a/../../outside"),
    ("..", ""), ("x", "a\\..\\b"), ("x\x00", ""), ("", "d"), ("a/b", ""),
])
def test_unsafe_paths_are_rejected_even_when_the_codec_is_bypassed(sandbox, name, subdir):
    out, _ = sandbox
    reassembler = Reassembler("disk", out)
    rejected(reassembler.add(forged(b"data", 0, 1, 1, name=name, subdir=subdir)),
             "unsafe path")
    assert user_files(out) == set() and staged(reassembler) == set()


@pytest.mark.parametrize("mode", [Mode.DISK, Mode.BOTH])
def test_symlinks_below_output_dir_are_never_followed(sandbox, mode):
    out, outside = sandbox
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "real").mkdir()
    (out / "real" / "nested").symlink_to(outside, target_is_directory=True)
    reassembler = Reassembler(mode, out)
    for subdir in ("link", "real/nested", "link/deeper"):
        result = reassembler.add(forged(b"data", 0, 1, 1, name="x", subdir=subdir))
        if mode is Mode.BOTH:  # the local copy cannot be published there
            rejected(result, "cannot write below output_dir")
        else:  # disk mode writes only in its staging folder: the links do not matter
            assert result.completed.path.read_bytes() == b"data"
    assert user_files(out) == {"link", "real", "real/nested"}


def test_a_final_path_that_is_a_symlink_is_replaced_not_followed(sandbox):
    out, outside = sandbox
    out.mkdir()
    (out / "f.bin").symlink_to(outside / "sentinel")
    reassembler = Reassembler("both", out)
    done = feed(reassembler, chunks_of(b"fresh data"))[-1].completed
    assert not done.path.is_symlink() and done.path.read_bytes() == b"fresh data"


def test_a_final_path_that_is_a_directory_rejects_the_file(sandbox):
    out, _ = sandbox
    (out / "f.bin" / "inner").mkdir(parents=True)
    reassembler = Reassembler("both", out)
    rejected(feed(reassembler, chunks_of(b"abc"))[-1], "cannot write below output_dir")
    assert user_files(out) == {"f.bin", "f.bin/inner"} and staged(reassembler) == set()


def test_a_regular_file_where_a_folder_should_be_rejects_the_file(sandbox):
    out, _ = sandbox
    out.mkdir()
    (out / "d").write_bytes(b"i am a file")
    reassembler = Reassembler("both", out)
    rejected(reassembler.add(forged(b"data", 0, 1, 1, subdir="d")), "cannot write")


def test_every_hostile_message_is_refused_before_reaching_the_disk(sandbox):
    out, _ = sandbox
    good = chunks_of(b"hello world", "ok.txt", "", 4)
    key, value = encode_chunk(good[0])
    hostile = [b"\x00garbage", value[:-3], value + b"extra", value.replace(b"ok.txt", b"ok.tx\xff"),
               encode_chunk(forged(b"data", 0, 1, 1, name="..", subdir=""))[1],
               encode_chunk(forged(b"data", 0, 1, 1, subdir="/abs"))[1],
               encode_chunk(Chunk("f", b"h" * 64, b"c" * 64, 0, 1, 1, "", "", b"data"))[1]]
    reassembler = Reassembler("disk", out)
    for message in hostile:
        with pytest.raises(ChunkDecodeError):
            reassembler.add(decode_chunk(message, key))
    assert user_files(out) == set() and staged(reassembler) == set()


# ---------------------------------------------------------------- storage failures


def test_disk_full_is_transient_and_the_chunk_can_be_added_again(sandbox, monkeypatch):
    out, _ = sandbox
    reassembler = Reassembler("disk", out)
    chunks = chunks_of(b"abcdefgh", size=4)
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_disk_module.os, "pwrite", full)
    with pytest.raises(StorageError, match="No space left"):
        reassembler.add(chunks[0])
    assert reassembler.in_progress() == []
    monkeypatch.setattr(safe_disk_module.os, "pwrite", real_pwrite)
    assert feed(reassembler, chunks)[-1].completed.path.read_bytes() == b"abcdefgh"


@pytest.mark.parametrize(("mode", "call"), [(Mode.BOTH, "replace"), (Mode.DISK, "preadv")])
def test_a_failed_completion_is_retried_by_a_redelivered_chunk(sandbox, monkeypatch, mode,
                                                               call):
    """Both mode fails to publish the local copy, disk mode to read the file back."""
    out, _ = sandbox
    reassembler = Reassembler(mode, out)
    chunks = chunks_of(b"abcdefgh", size=4)
    reassembler.add(chunks[1])  # out of order: completion must read the file back
    real = getattr(os, call)
    monkeypatch.setattr(safe_disk_module.os, call,
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(StorageError):
        reassembler.add(chunks[0])
    monkeypatch.setattr(safe_disk_module.os, call, real)
    done = reassembler.add(chunks[0]).completed
    assert done.path.read_bytes() == b"abcdefgh"
    assert done.sha256 == hashlib.sha256(b"abcdefgh").hexdigest()


def test_finished_keys_are_remembered_only_up_to_a_bound():
    reassembler = Reassembler("memory", max_finished=2)
    files = [chunks_of(bytes([i]) * 3, f"f{i}") for i in range(3)]
    for chunks in files:
        feed(reassembler, chunks)
    assert reassembler.add(files[2][0]).status is AddStatus.DUPLICATE
    # the oldest was forgotten: a redelivery starts (and completes) it again
    assert reassembler.add(files[0][0]).status is AddStatus.COMPLETED


@pytest.mark.parametrize("mode", MODES)
def test_large_chunks_arriving_as_from_several_partitions_rebuild_the_file(sandbox, mode):
    """Chunks over the inline size go to the hash thread, and in disk mode chunks that
    arrived early are read back there once the in-order prefix reaches them."""
    out, _ = sandbox
    data = random.Random(7).randbytes(40 * 200_000 + 123)
    chunks = chunks_of(data, size=200_000)
    order = chunks[1::3] + chunks[0::3] + chunks[2::3]
    reassembler = Reassembler(mode, out)  # kept: closing it deletes its staging files
    done = [r.completed for r in feed(reassembler, order) if r.completed]
    assert len(done) == 1
    assert done[0].sha256 == hashlib.sha256(data).hexdigest()
    if mode is not Mode.MEMORY:
        assert done[0].path.read_bytes() == data


def test_a_read_back_failing_on_the_hash_thread_is_redone_at_completion(sandbox, monkeypatch):
    out, _ = sandbox
    data = b"0123456789abcdef"
    chunks = chunks_of(data, size=4)
    reassembler = Reassembler("disk", out)
    real = safe_disk_module.StagingArea.hash_range
    calls = []

    def flaky(self, *args):
        calls.append(args[1:3])
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        return real(self, *args)

    monkeypatch.setattr(safe_disk_module.StagingArea, "hash_range", flaky)
    feed(reassembler, [chunks[1], chunks[2]])
    done = feed(reassembler, [chunks[0], chunks[3]])[-1].completed
    assert calls == [(4, 12), (0, 16)]  # the early chunks, then the whole file again
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    assert done.path.read_bytes() == data
