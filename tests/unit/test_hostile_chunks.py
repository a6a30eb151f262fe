"""Poison pills: chunks whose integers no real file can have, in every mode.

Each must be rejected with a clear reason, at once (the message alone when the chunk's
own claims are impossible, never vetoing a genuine file of that name and hash), never an exception out of
``Reassembler.add`` (an OverflowError from ``os.pwrite`` is not an OSError) and never a
transient StorageError (that would hold its partition's commit for ever). And every
chunk must cost O(1)-ish whatever ``n_total_chunks`` it claims.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

from girder_upload_stream.assembly import safe_disk as safe_disk_module
from girder_upload_stream.wire.codec import (DEFAULT_MAX_FILE_BYTES, MAX_POSSIBLE_FILE_BYTES, Chunk,
                                        decode_chunk, encode_chunk)
from girder_upload_stream.errors import ChunkDecodeError, StorageError
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import RawMessage
from girder_upload_stream.assembly.reassembly import AddStatus, Mode, Reassembler

MODES = [Mode.MEMORY, Mode.DISK, Mode.BOTH]


def forged(data: bytes, offset: int, i: int, n: int, name: str = "f.bin",
           file_data: bytes = b"whole file") -> Chunk:
    """A chunk with a valid chunk hash and any integers (bypasses the codec's checks)."""
    return Chunk(name, hashlib.sha512(file_data).digest(), hashlib.sha512(data).digest(),
                 offset, i, n, "", "", data)


def make(mode: Mode, tmp_path, limit: int | None = DEFAULT_MAX_FILE_BYTES) -> Reassembler:
    return Reassembler(mode, tmp_path / "out" if mode is not Mode.MEMORY else None, limit)


def staged(reassembler: Reassembler) -> list:
    return [] if reassembler.staging_dir is None else list(reassembler.staging_dir.iterdir())


def assert_rejected(result, fragment: str) -> None:
    assert result.status is AddStatus.REJECTED, result
    assert fragment in result.reason, result.reason


def assert_refused(result, fragment: str) -> None:
    """The chunk rejects itself alone (its message), never its file."""
    assert result.status is AddStatus.REFUSED and result.rejected is None, result
    assert fragment in result.reason, result.reason


# ------------------------------------------------------------ integers at their limits

# (offset, chunk_i, n_total) of one 4-byte chunk; none can belong to a file of <= 2**63-1
# bytes, so every limit (the default, or none at all) refuses them.
IMPOSSIBLE = [
    (0, 1, 2**63 - 1), (0, 1, 2**63), (0, 1, 2**64), (0, 1, 2**64 - 1),
    (2**63 - 1, 2, 2), (2**63, 2, 2), (2**64, 2, 2), (2**63 - 4, 2, 2),
    (0, 2**63, 2**63), (2**64, 2**64, 2**64), (-1, 2, 2), (0, 2, 2), (5, 0, 3),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", [DEFAULT_MAX_FILE_BYTES, None], ids=["1TiB", "none"])
@pytest.mark.parametrize(("offset", "i", "n"), IMPOSSIBLE)
def test_integers_no_file_can_have_reject_the_file_in_every_mode(tmp_path, mode, limit,
                                                                 offset, i, n):
    reassembler = make(mode, tmp_path, limit)
    result = reassembler.add(forged(b"data", offset, i, n))
    assert result.status is AddStatus.REFUSED, result
    assert result.reason.startswith(("file too large", "impossible placement")), result.reason
    again = reassembler.add(forged(b"data", offset, i, n))  # the same pill sent twice
    assert again.status is AddStatus.REFUSED  # each time: the key is never poisoned
    assert reassembler.in_progress() == [] and staged(reassembler) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_huge_chunk_count_sent_twice_is_rejected_each_time_and_vetoes_nothing(tmp_path,
                                                                                 mode):
    reassembler = make(mode, tmp_path)
    first = reassembler.add(forged(b"data", 0, 1, 2**62))
    assert_refused(first, f"{2**62} chunks exceed the {DEFAULT_MAX_FILE_BYTES}-byte limit")
    assert "--max_file_size_mb" in first.reason
    for chunk in (forged(b"data", 0, 1, 2**62), forged(b"more", 4, 2, 2**62)):
        assert reassembler.add(chunk).status is AddStatus.REFUSED
    # The genuine file of that name and hash is not vetoed by the pills.
    genuine = forged(b"whole file", 0, 1, 1)
    assert reassembler.add(genuine).status is AddStatus.COMPLETED


@pytest.mark.parametrize("mode", MODES)
def test_without_a_limit_a_huge_chunk_count_is_a_file_in_progress(tmp_path, mode):
    """2**62 chunks fit in a file offset: only the size limit can refuse them."""
    reassembler = make(mode, tmp_path, None)
    assert reassembler.add(forged(b"data", 0, 1, 2**62)).status is AddStatus.ACCEPTED
    assert reassembler.add(forged(b"data", 0, 1, 2**62)).status is AddStatus.DUPLICATE
    assert reassembler.add(forged(b"more", 4, 2, 2**62)).status is AddStatus.ACCEPTED
    assert reassembler.received(forged(b"x", 0, 1, 2**62).file_key) == [1, 2]
    [progress] = reassembler.in_progress()
    assert (progress.n_received, progress.n_total) == (2, 2**62)


@pytest.mark.parametrize("mode", MODES)
def test_offsets_just_under_and_just_over_the_limit(tmp_path, mode):
    limit = 1000
    data = bytes(range(256)) * 3 + bytes(232)  # exactly 1000 bytes
    head, tail = data[:996], data[996:]
    reassembler = make(mode, tmp_path, limit)
    # A file of exactly the limit completes.
    assert reassembler.add(forged(tail, 996, 2, 2, "exact", data)).status is AddStatus.ACCEPTED
    done = reassembler.add(forged(head, 0, 1, 2, "exact", data)).completed
    assert done is not None and done.size == limit
    # One byte over: the chunk ends past the limit.
    assert_refused(reassembler.add(forged(b"abcd", 997, 2, 2, "over")),
                    "chunk 2 ends at byte 1001, over the 1000-byte limit")
    # In bounds itself, but the chunks that follow need one byte each.
    assert_refused(reassembler.add(forged(b"x" * 999, 0, 1, 3, "follow")),
                    "chunk 1 ends at byte 999 and 2 more chunk(s) follow")
    assert reassembler.add(forged(b"x" * 998, 0, 1, 3, "fits")).status is AddStatus.ACCEPTED
    # n_total_chunks at the limit, and one over.
    assert reassembler.add(forged(b"y", 0, 1, limit, "many")).status is AddStatus.ACCEPTED
    assert_refused(reassembler.add(forged(b"y", 0, 1, limit + 1, "toomany")),
                    "1001 chunks exceed the 1000-byte limit")


@pytest.mark.parametrize(("offset", "n"), [(MAX_POSSIBLE_FILE_BYTES - 4, 2),
                                           (MAX_POSSIBLE_FILE_BYTES - 3, 2)])
def test_the_largest_possible_offset_is_accepted_or_rejected_by_a_byte(tmp_path, offset, n):
    reassembler = make(Mode.MEMORY, tmp_path, None)
    result = reassembler.add(forged(b"data", offset, 2, n))
    fits = offset + 4 <= MAX_POSSIBLE_FILE_BYTES
    assert result.status is (AddStatus.ACCEPTED if fits else AddStatus.REFUSED), result


def test_a_limit_beyond_a_file_offset_is_refused():
    with pytest.raises(ValueError, match="max_file_bytes"):
        Reassembler("memory", max_file_bytes=2**63)
    with pytest.raises(ValueError, match="max_file_bytes"):
        Reassembler("memory", max_file_bytes=0)


# ------------------------------------------------------------ errors of the OS layer

def _probe(tmp_path, offset: int) -> OSError | None:
    """What this machine's file system says to one byte written at ``offset``."""
    path = tmp_path / "probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", offset)
        return None
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        path.unlink()


@pytest.mark.parametrize("mode", [Mode.DISK, Mode.BOTH])
@pytest.mark.parametrize("offset", [2**44, 2**50, 2**62, MAX_POSSIBLE_FILE_BYTES - 8])
def test_an_offset_the_file_system_refuses_rejects_the_file(tmp_path, mode, offset):
    """With no size limit the chunk reaches the disk: whatever the file system refuses
    (ext4: EFBIG past 16 TiB, EINVAL near 2**63) is the file's fault, not the storage's."""
    refused = _probe(tmp_path, offset)
    reassembler = make(mode, tmp_path, None)
    result = reassembler.add(forged(b"data", offset, 2, 3))
    if refused is None:  # this file system holds a file that large (sparse)
        assert result.status is AddStatus.ACCEPTED
        reassembler.discard(result.file_key)
    else:
        assert_rejected(result, f"cannot write below output_dir: {refused.strerror}")
    assert staged(reassembler) == []


@pytest.mark.parametrize("mode", [Mode.DISK, Mode.BOTH])
@pytest.mark.parametrize(("error", "fragment"), [
    (OverflowError("Python int too large to convert to C long"), "too large to convert"),
    (ValueError("embedded null byte"), "embedded null byte"),
    (OSError(errno.EFBIG, "File too large"), "File too large"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), "File name too long"),
    (OSError(errno.EOVERFLOW, "Value too large"), "Value too large"),
    (OSError(errno.EINVAL, "Invalid argument"), "Invalid argument"),
])
def test_os_errors_that_are_the_files_fault_reject_it(tmp_path, monkeypatch, mode, error,
                                                      fragment):
    reassembler = make(mode, tmp_path)

    def refuse(*_args):
        raise error

    monkeypatch.setattr(safe_disk_module.os, "pwrite", refuse)
    result = reassembler.add(forged(b"data", 0, 1, 2))
    assert_rejected(result, fragment)
    assert reassembler.add(forged(b"more", 4, 2, 2)).status is AddStatus.IGNORED


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EDQUOT])
def test_a_failing_storage_stays_transient(tmp_path, monkeypatch, code):
    reassembler = make(Mode.DISK, tmp_path)
    monkeypatch.setattr(safe_disk_module.os, "pwrite",
                        lambda *_a: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(StorageError):
        reassembler.add(forged(b"data", 0, 1, 2))
    assert reassembler.in_progress() == []


# ------------------------------------------------------------ O(1) per chunk

@pytest.mark.parametrize("mode", MODES)
def test_ten_thousand_chunks_of_a_file_claiming_2_62_chunks_cost_little(tmp_path, mode):
    reassembler = make(mode, tmp_path, None)
    size = 16
    chunks = [forged(bytes([i % 251]) * size, (i - 1) * size, i, 2**62)
              for i in range(1, 10_001)]
    chunks += chunks[:100]  # and some of them sent twice
    start = time.perf_counter()
    statuses = [reassembler.add(chunk).status for chunk in chunks]
    elapsed = time.perf_counter() - start
    print(f"\n[O(1)] {mode.value}: 10,100 chunks of a file claiming 2**62 chunks in "
          f"{elapsed * 1000:.0f} ms ({elapsed / len(chunks) * 1e6:.1f} us/chunk)")
    assert statuses.count(AddStatus.ACCEPTED) == 10_000
    assert statuses.count(AddStatus.DUPLICATE) == 100
    assert len(reassembler.received(chunks[0].file_key)) == 10_000
    assert elapsed < 5.0  # O(n_total) would not end; O(k) per chunk is about 50 ms here


def test_chunks_spread_far_apart_in_a_huge_file_cost_little():
    """Neighbour checks look at the nearest chunks only, not at the chunks between."""
    reassembler = Reassembler("memory", max_file_bytes=None)
    chunks = [forged(b"z" * 16, k * 2**41, 1 + k * 2**40, 2**62) for k in range(10_000)]
    start = time.perf_counter()
    statuses = {reassembler.add(chunk).status for chunk in reversed(chunks)}
    elapsed = time.perf_counter() - start
    print(f"\n[O(1)] 10,000 chunks 2**40 apart: {elapsed * 1000:.0f} ms")
    assert statuses == {AddStatus.ACCEPTED} and elapsed < 5.0


def test_a_pill_through_the_stream_processor_is_recorded_and_done(tmp_path):
    """The consumer's core takes every pill as a recorded rejection, and its offsets
    move on: nothing escapes ``handle`` and nothing is held."""
    processor = StreamProcessor(Reassembler("disk", tmp_path / "out"))
    pills = [forged(b"data", 0, 1, 2**62), forged(b"data", 0, 1, 2**62),
             forged(b"more", 4, 2, 2**62), forged(b"data", 0, 1, 2**63, "g.bin"),
             forged(b"data", 2**63 - 2, 2, 2, "h.bin")]
    for offset, chunk in enumerate(pills):
        key, value = encode_chunk(chunk)
        processor.handle(RawMessage("t", 0, offset, key.encode(), value))
    # 2**62 chunks: each pill rejects its own message, never the file (no key poisoned);
    # the codec refuses the other two.
    assert processor.counters.files_failed == 0
    assert processor.counters.messages_rejected == 5
    assert processor.offsets.committable() == {("t", 0): len(pills)}
    with pytest.raises(ChunkDecodeError):
        decode_chunk(encode_chunk(pills[3])[1])


def test_the_command_line_option_is_bounded_by_what_a_file_offset_holds(capsys):
    import argparse

    from girder_upload_stream.cli.run import add_run_arguments
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, default_config="test")
    base = ["http://girder/api/v1", "key"]
    assert parser.parse_args(base).max_file_size_mb << 20 == DEFAULT_MAX_FILE_BYTES
    largest = parser.parse_args(base + ["--max_file_size_mb", str(2**43 - 1)])
    assert largest.max_file_size_mb << 20 <= MAX_POSSIBLE_FILE_BYTES
    for bad in ("0", str(2**43), "1.5", "-3"):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(base + ["--max_file_size_mb", bad])
        assert stopped.value.code == 2
    assert "--max_file_size_mb" in capsys.readouterr().err


def test_a_huge_chunk_count_under_the_limit_sent_twice_keeps_each_message_cheap(tmp_path):
    """Through the whole core: a file claiming 2**39 chunks (under the default limit),
    its first chunk sent twice, then 10,000 more chunks."""
    processor = StreamProcessor(Reassembler("memory"))
    chunks = [forged(b"d", 0, 1, 2**39), forged(b"d", 0, 1, 2**39)]
    chunks += [forged(b"e", i - 1, i, 2**39) for i in range(2, 10_002)]
    messages = [RawMessage("t", 0, offset, key.encode(), value)
                for offset, (key, value) in enumerate(map(encode_chunk, chunks))]
    start = time.perf_counter()
    for message in messages:
        processor.handle(message)
    elapsed = time.perf_counter() - start
    print(f"\n[O(1)] pipeline: {len(messages)} messages of a file claiming 2**39 chunks "
          f"in {elapsed * 1000:.0f} ms")
    assert processor.counters.messages_rejected == processor.counters.files_failed == 0
    assert elapsed < 10.0
