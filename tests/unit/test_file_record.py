"""A file's state in one record (issue 20 §8): the record holds every per-file handle
(its assembly, its pending offsets, its stream, its attempts), and its named transitions
return the effects they call for. These tests walk the transitions and compare the
effects; the last ones check that the processor carries them out."""

from __future__ import annotations

import hashlib

import pytest

from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.assembly.reassembly import AddStatus, Reassembler
from girder_upload_stream.shared_types import CompletedFile, RETRIED_NEXT_RUN, RejectedFile
from girder_upload_stream.ledger.effects import (AbandonStream, DropAssembly, FinishAssembly,
                                                 ReleaseOffsets, ReleaseStaging, WriteRow)
from girder_upload_stream.ledger.offsets import OffsetTracker
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.ledger.records import FileLedger, FileState, LedgerError, Role
from girder_upload_stream.wire.codec import Chunk
from tests.unit.fakes import TOPIC, Clock, Log, SpyRecorder, encoded, make_processor

KEY = ("sub/a.bin", b"\x01" * 64)
P0, P1 = (TOPIC, 0), (TOPIC, 1)


class Handle:
    """A stream session's stand-in: only identity matters to the ledger."""

    def __repr__(self) -> str:
        return "<stream>"


def completed(key=KEY, size: int = 5) -> CompletedFile:
    return CompletedFile(key[0], key[1], "s" * 64, size, 2, 1.0, 2.0, 0.0,
                         Pieces([b"x" * size]), None)


def assembling(ledger: FileLedger, tracker: OffsetTracker, *offsets: int):
    """A record assembling a file (its first chunk of two in a real reassembler), its
    messages at ``offsets`` of p0 pending."""
    reassembler = Reassembler()
    data = b"abcdefgh"
    chunk = Chunk("a.bin", hashlib.sha512(data).digest(), hashlib.sha512(data[:4]).digest(),
                  0, 1, 2, "sub", "", data[:4])
    assert reassembler.add(chunk).status is AddStatus.ACCEPTED
    record = ledger.open(chunk.file_key)
    record.assembly = reassembler.assembly(chunk.file_key)
    for offset in offsets:
        tracker.read(P0, offset, record.pending)
    return record


def test_hand_over_is_one_transition_and_its_effects() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = ledger.open(KEY)
    tracker.read(P0, 0, record.pending)
    ledger.stream(KEY, handle := Handle())
    done = completed()
    ledger.complete(KEY, done)
    effects = ledger.hand_over(KEY)
    assert effects == [AbandonStream(handle), DropAssembly(KEY), ReleaseStaging(done),
                       WriteRow("file_dropped", (record.progress(),))]
    assert record.progress().n_received == 2 and not ledger.busy(KEY)
    # Its offsets are the next owner's: the runner forgets the partition, nothing here.
    assert not any(isinstance(e, ReleaseOffsets) for e in effects)


def test_a_transient_failure_is_counted_then_the_file_settles_releasing_its_messages() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = ledger.open(KEY)
    for offset in (0, 1):
        tracker.read(P0, offset, record.pending)
    ledger.complete(KEY, completed())
    ledger.dispatch(KEY, 1)
    ledger.retry_later(KEY, at=10.0)
    assert (record.state, record.failures) == (FileState.WAITING_TO_RETRY, 1)
    assert ledger.due(10.0) == [record]
    ledger.dispatch(KEY, 2)
    ledger.retry_later(KEY, at=20.0)
    assert record.failures == 2  # the retry policy's attempt count lives on the record
    ledger.due(20.0)
    ledger.dispatch(KEY, 3)
    assert tracker.committable() == {P0: 0}
    effects = ledger.finish(KEY, FileState.DONE)
    assert effects == [ReleaseOffsets(record.pending, False)]
    assert tracker.committable() == {P0: 0}  # nothing happens until it is carried out
    tracker.file_done(effects[0].pending, effects[0].retry)
    assert tracker.committable() == {P0: 2} and len(record.pending) == 0


def test_a_failure_for_good_releases_its_messages_for_the_next_run() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = ledger.open(KEY)
    tracker.read(P0, 3, record.pending)
    ledger.complete(KEY, completed())
    ledger.dispatch(KEY, 1)
    [release] = ledger.finish(KEY, FileState.FAILED, retry=True)
    assert release == ReleaseOffsets(record.pending, True)
    assert ledger.failed_for_good(KEY)
    tracker.file_done(release.pending, release.retry)
    assert tracker.failed_spans(P0, 4) == [(3, 4)]  # offsets rule 9: read again


@pytest.mark.parametrize("role, retried", [(Role.FIRST, True), (Role.AGAIN, False)])
def test_a_rejection_abandons_the_stream_writes_rows_and_dead_letters_every_message(
        role, retried) -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = ledger.open(KEY, role)
    tracker.read(P0, 0, record.pending)
    if role is Role.FIRST:
        ledger.stream(KEY, handle := Handle())
    rejected = RejectedFile(KEY[0], KEY[1], "mismatched hash", 2, 2, 1.0, 2.0, retry=True)
    recorded, effects = ledger.reject(KEY, rejected, (P1, 7))
    assert (RETRIED_NEXT_RUN in recorded.reason) is retried
    where = [(P0, 0), (P1, 7)]  # its pending messages and the one that rejected it
    assert effects == ([AbandonStream(handle)] if role is Role.FIRST else []) + [
        WriteRow("file_rejected", (recorded,)),
        WriteRow("file_messages_rejected", (recorded, where)),
        ReleaseOffsets(record.pending, retried)]
    assert not ledger.busy(KEY)


def test_competing_copies_abandon_the_stream_for_good() -> None:
    ledger = FileLedger()
    record = ledger.open(KEY)
    ledger.stream(KEY, handle := Handle())
    assert ledger.abandon_stream(KEY, for_good=True) == [AbandonStream(handle)]
    assert (record.state, record.stream, record.stream_tried) == \
        (FileState.ASSEMBLING, None, True)
    assert ledger.abandon_stream(KEY, for_good=True) == []  # nothing open any more
    with pytest.raises(LedgerError):
        ledger.unstream(KEY)
    assert ledger.abandon_stream(("gone", b""), for_good=True) == []


def test_a_stale_file_is_released_once_and_a_released_one_dropped_with_its_offsets() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = assembling(ledger, tracker, 0, 1)
    key = record.key
    ledger.stream(key, handle := Handle())
    progress = record.progress()
    effects = ledger.go_stale(key, progress, 60.0)
    assert effects[:2] == [AbandonStream(handle), ReleaseOffsets(record.pending, False)]
    assert effects[2].call == "file_stale" and "its 2 message(s) were released" \
        in effects[2].args[1]
    assert record.state is FileState.RELEASED
    assert ledger.go_stale(key, progress, 60.0) == []  # released before
    tracker.file_done(record.pending)
    tracker.read(P0, 2, record.pending)  # a chunk after its release holds again ...
    assert ledger.drop(key) == [DropAssembly(key), ReleaseOffsets(record.pending, False)]
    # ... and is released with the file when it is dropped (before, it held for ever);
    # its stale row stays (no file_dropped): it says why its messages are not read again


def test_a_file_dropped_before_any_release_takes_its_row_away() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = assembling(ledger, tracker, 0, 1)
    progress = record.progress()
    assert ledger.drop(record.key)[-1] == WriteRow("file_dropped", (progress,))


def test_a_partial_file_found_in_girder_finishes_its_assembly() -> None:
    ledger, tracker = FileLedger(), OffsetTracker()
    record = assembling(ledger, tracker, 4)
    progress = record.progress()
    assert ledger.found(record.key, progress) == [
        FinishAssembly(record.key), WriteRow("file_found", (progress,)),
        ReleaseOffsets(record.pending, False)]
    assert ledger.is_known_done(record.key)


def test_a_row_is_one_the_recorder_writes() -> None:
    with pytest.raises(ValueError):
        WriteRow("__class__", ())


# ---------------------------------------------------------------- carried out


def test_the_processor_carries_out_a_hand_over_in_one_place() -> None:
    log = Log()
    proc = make_processor()
    for pair in encoded(b"A" * 16, "a.bin"):
        proc.handle(log.put(0, *pair))
    [record] = proc.ledger.in_state(FileState.READY)
    done = record.completed
    released = []
    proc.reassembler.release = released.append
    assert proc.hand_over([P0]) == 1
    assert released == [done] and not proc.reassembler.is_completed(record.key)
    assert proc.offsets.pending_count() == 2  # until the runner forgets p0


def test_a_released_file_dropped_at_the_bound_of_files_in_progress_frees_its_commit() -> None:
    """Found while moving the offsets into the record: a stale (released) file that got
    a chunk after its release and was then forgotten to make room for another file left
    that chunk pending for ever: the partition's commit froze."""
    wall = Clock(1000.0)
    log = Log()
    proc = StreamProcessor(Reassembler(clock=wall), max_files_in_progress=1,
                           stale_partial_seconds=10.0, wall_clock=wall,
                           recorder=SpyRecorder(), clock=Clock())
    a = encoded(b"A" * 24, "a.bin")
    proc.handle(log.put(0, *a[0]))
    wall.now += 11
    proc.expire_stale()  # a.bin released: offset 0 done
    assert proc.offsets.committable() == {P0: 1}
    proc.handle(log.put(0, *a[1]))  # a later chunk of it holds again
    assert proc.offsets.committable() == {P0: 1}
    b = encoded(b"B" * 8, "b.bin")
    proc.handle(log.put(0, *b[0]))  # no room: a.bin is forgotten, b.bin completes
    assert [r.key[0] for r in proc.ledger.in_state(FileState.READY)] == ["b.bin"]
    assert proc.offsets.committable() == {P0: 2}  # a.bin's chunk no longer holds it
