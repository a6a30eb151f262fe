"""Unit tests of streamed uploads: the ledger's STREAMING state and its transitions, and
the processor's decisions (when a stream opens, what it may read, what is held back,
when it is abandoned), with a fake session in place of Girder."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from girder_upload_stream.assembly.reassembly import Mode
from girder_upload_stream.shared_types import CompletedFile, FileOutcome, Outcome
from girder_upload_stream.ledger.records import FileLedger, FileState, LedgerError
from girder_upload_stream.ledger.streams import wants_stream
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.unit.fakes import Log, make_processor, outcomes

KEY = ("big.bin", b"h" * 64)


def _completed() -> CompletedFile:
    return CompletedFile("big.bin", KEY[1], "s", 10, 1, 0.0, 0.0, 0.0, None, None)


# ------------------------------------------------------------------- the ledger

def test_a_streamed_file_walks_streaming_ready_uploading_done() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    handle = object()
    ledger.stream(KEY, handle)
    record = ledger.get(KEY)
    assert record.state is FileState.STREAMING and record.stream is handle
    assert ledger.count(FileState.STREAMING) == 1
    ledger.complete(KEY, _completed())
    assert record.state is FileState.READY and record.stream is handle
    ledger.dispatch(KEY, 1)
    ledger.settle(KEY, FileState.DONE)
    assert ledger.get(KEY) is None and ledger.is_known_done(KEY)


def test_unstream_goes_back_to_assembling_and_hands_the_session_back() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    handle = object()
    ledger.stream(KEY, handle)
    assert ledger.unstream(KEY) is handle
    record = ledger.get(KEY)
    assert record.state is FileState.ASSEMBLING and record.stream is None
    assert record.stream_tried  # never streamed twice
    ledger.complete(KEY, _completed())
    assert record.state is FileState.READY


def test_a_streaming_file_with_a_mismatched_hash_settles_failed() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.stream(KEY, object())
    ledger.settle(KEY, FileState.FAILED)
    assert ledger.get(KEY) is None


@pytest.mark.parametrize("state", ["streaming", "ready"])
def test_transitions_the_machine_does_not_allow(state) -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.stream(KEY, object())
    if state == "ready":
        ledger.complete(KEY, _completed())
        with pytest.raises(LedgerError):
            ledger.unstream(KEY)
    with pytest.raises(LedgerError):
        ledger.stream(KEY, object())
    if state == "streaming":
        with pytest.raises(LedgerError):
            ledger.release(KEY)  # the processor unstreams (abandons) first
        with pytest.raises(LedgerError):
            ledger.dispatch(KEY, 1)


def test_wants_stream() -> None:
    assert wants_stream(10, 100, 950, 900, True, 100, 900)
    assert not wants_stream(10, 100, None, 900, True, 100, -1)  # size unknown: no last chunk
    assert not wants_stream(10, 100, 950, None, True, 100, 900)  # streaming off
    assert not wants_stream(10, 100, 950, 900, False, 100, 900)  # holds no commit
    assert not wants_stream(8, 100, 750, 900, True, 100, 700)  # small: batched units


@pytest.mark.parametrize("prefix_end, last_offset, size", [
    (0, 900, 950),        # the last chunk alone: no byte from offset 0 in hand
    (300, 200, 950),      # the last chunk claims to start inside the prefix held
    (300, 950, 950),      # ... or to be empty
])
def test_wants_stream_needs_evidence_in_hand(prefix_end, last_offset, size) -> None:
    assert not wants_stream(10, 100, size, 900, True, prefix_end, last_offset)


def test_a_lone_last_chunk_or_chunks_without_the_first_open_no_stream(tmp_path) -> None:
    """A message claiming to be the last chunk of a huge file opens nothing; neither do
    chunks without offset 0; the first chunk then does."""
    data = random.Random(5).randbytes(1_000)
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    messages = _messages(log, data, "big.bin", 100, [9, 2, 3, 4, 5, 0])
    for msg in messages[:5]:
        proc.handle(msg)
    assert opener.sessions == []
    proc.handle(messages[5])
    [session] = opener.sessions
    assert session.plan.view() == (1_000, 100, 900)


# ------------------------------------------------------------------ the processor

class FakeSession:
    def __init__(self, plan) -> None:
        self.plan, self.nudges, self.abandoned, self.closed = plan, 0, False, False

    def nudge(self) -> None:
        self.nudges += 1

    def abandon(self) -> None:
        self.abandoned = True

    def close(self, timeout: float) -> None:
        self.closed = True


class Opener:
    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []

    def __call__(self, plan) -> FakeSession:
        self.sessions.append(FakeSession(plan))
        return self.sessions[-1]


def _messages(log: Log, data: bytes, name: str, size: int, order: list[int]):
    chunks = list(chunk_file(data, "", size, filename=name))
    return [log.put(i % 4, *encode_chunk(chunks[i])) for i in order]


def _proc(mode: Mode, tmp_path, opener: Opener, **kwargs):
    out = tmp_path / "out" if mode is not Mode.MEMORY else None
    return make_processor(mode, out, open_stream=opener, stream_min_bytes=500, **kwargs)


@pytest.mark.parametrize("mode", [Mode.MEMORY, Mode.DISK, Mode.BOTH])
def test_a_big_file_streams_once_its_size_is_known_and_holds_back_its_last_chunk(
        mode, tmp_path) -> None:
    data = random.Random(1).randbytes(1_000)
    log, opener = Log(), Opener()
    proc = _proc(mode, tmp_path, opener)
    messages = _messages(log, data, "big.bin", 100, [0, 1, 2, 9, 3, 4, 6, 5, 7, 8])
    for msg in messages[:3]:
        proc.handle(msg)
    assert opener.sessions == []  # size unknown: its last chunk is not in yet
    proc.handle(messages[3])  # chunk 10 of 10: the size is known
    [session] = opener.sessions
    key = session.plan.rel_path, session.plan.file_hash
    assert session.plan.size == 1_000 and proc.ledger.get(key).state is FileState.STREAMING
    assert session.plan.view() == (1_000, 300, 900)  # prefix 0-300, held back from 900
    assert session.plan.read(0, 300) == data[:300]
    for msg in messages[4:7]:  # chunks 4, 5, 7
        proc.handle(msg)
    assert session.plan.view() == (1_000, 500, 900)
    assert session.plan.read(100, 500) == data[100:500]
    assert session.nudges == 3
    for msg in messages[7:]:
        proc.handle(msg)
    assert session.plan.view() is None  # completed: the finishing unit has the bytes
    [unit] = proc.take_units()
    assert unit.streams == {key: session} and proc.ledger.get(key).state is FileState.UPLOADING
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == log.end() and proc.counters.files_uploaded == 1
    assert not session.abandoned and len(opener.sessions) == 1


def test_a_mismatched_streamed_file_abandons_its_upload(tmp_path) -> None:
    data = bytes(1_000)
    chunks = list(chunk_file(data, "", 100, filename="bad.bin"))
    wrong = hashlib.sha512(b"something else").digest()
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    for chunk in [chunks[9]] + chunks[:9]:
        proc.handle(log.put(0, *encode_chunk(replace(chunk, file_hash=wrong))))
    [session] = opener.sessions
    assert session.abandoned
    assert proc.counters.files_failed == 1 and proc.take_units() == []
    assert proc.offsets.committable() == log.end()  # rejected: done (rule 3)


def test_revoked_partitions_abandon_streams_and_the_file_uploads_whole(tmp_path) -> None:
    data = random.Random(2).randbytes(1_000)
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    messages = _messages(log, data, "big.bin", 100, [9, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    for msg in messages[:5]:
        proc.handle(msg)
    [session] = opener.sessions
    assert proc.abandon_streams("test") == 1 and session.abandoned
    for msg in messages[5:]:
        proc.handle(msg)
    assert len(opener.sessions) == 1  # not opened again for the same record
    [unit] = proc.take_units()
    assert unit.streams == {} and bytes(unit.files[0].data) == data


def test_small_files_and_files_produced_again_do_not_stream(tmp_path) -> None:
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    for msg in _messages(log, bytes(400), "small.bin", 100, [3, 0, 1, 2]):
        proc.handle(msg)
    assert opener.sessions == []
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit))


def test_shutdown_closes_the_open_streams(tmp_path) -> None:
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    for msg in _messages(log, bytes(1_000), "big.bin", 100, [9, 0]):
        proc.handle(msg)
    proc.close_streams(timeout=0.1)
    assert opener.sessions[0].closed


def test_a_stale_streaming_file_abandons_its_upload(tmp_path) -> None:
    from tests.unit.fakes import Clock
    wall = Clock()
    log, opener = Log(), Opener()
    proc = make_processor(Mode.MEMORY, None, open_stream=opener, stream_min_bytes=500,
                          stale_partial_seconds=10.0, wall_clock=wall)
    proc.reassembler._clock = wall
    for msg in _messages(log, bytes(1_000), "big.bin", 100, [9, 0]):
        proc.handle(msg)
    wall.now += 60.0
    proc.expire_stale()
    [session] = opener.sessions
    record = proc.ledger.get((session.plan.rel_path, session.plan.file_hash))
    assert session.abandoned and record.state is FileState.RELEASED


def test_outcome_of_a_failed_finish_retries_it_later(tmp_path) -> None:
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    for msg in _messages(log, bytes(1_000), "big.bin", 100, [9, *range(9)]):
        proc.handle(msg)
    [unit] = proc.take_units()
    key = unit.files[0].file_key
    proc.finish_unit(unit, [FileOutcome(key[0], key, Outcome.FAILED_TRANSIENT, "503")])
    assert proc.ledger.get(key).state is FileState.WAITING_TO_RETRY
    assert proc.ledger.get(key).stream is opener.sessions[0]  # the retry resumes it


def test_at_most_max_open_streams_files_stream_at_once(tmp_path) -> None:
    from girder_upload_stream.ledger.streams import MAX_OPEN_STREAMS
    log, opener = Log(), Opener()
    proc = _proc(Mode.MEMORY, tmp_path, opener)
    for i in range(MAX_OPEN_STREAMS + 3):  # last chunks (and one more) of files to come
        for msg in _messages(log, bytes([i]) * 1_000, f"f{i}.bin", 100, [9, 0]):
            proc.handle(msg)
    assert len(opener.sessions) == MAX_OPEN_STREAMS
    assert proc.ledger.count(FileState.STREAMING) == MAX_OPEN_STREAMS
    # One finishes: the next file's next chunk opens a stream.
    for msg in _messages(log, bytes([0]) * 1_000, "f0.bin", 100, list(range(1, 9))):
        proc.handle(msg)
    for msg in _messages(log, bytes([MAX_OPEN_STREAMS]) * 1_000, f"f{MAX_OPEN_STREAMS}.bin",
                         100, [1]):
        proc.handle(msg)
    assert len(opener.sessions) == MAX_OPEN_STREAMS + 1
