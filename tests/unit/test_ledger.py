"""The file ledger's state machine: every named transition, the ones it refuses, what
it remembers of settled files, and the O(1) copy counter."""

from __future__ import annotations

import time

import pytest

from girder_upload_stream.ledger.records import (FileLedger, FileState, LedgerError,
                                                 RepeatCounter, Role, Route)
from girder_upload_stream.shared_types import CompletedFile, file_generation
from girder_upload_stream.assembly.pieces import Pieces

KEY = ("sub/a.bin", b"\x01" * 64)


def completed(key=KEY, size: int = 5, in_memory: bool = True) -> CompletedFile:
    return CompletedFile(key[0], key[1], "s" * 64, size, 2, 1.0, 2.0, 0.0,
                         Pieces([b"x" * size]) if in_memory else None, None)


def test_the_happy_path_walks_every_state_and_holds_bytes_while_waiting() -> None:
    ledger = FileLedger()
    record = ledger.open(KEY)
    assert (record.state, record.role, ledger.busy(KEY)) == (FileState.ASSEMBLING, Role.FIRST, True)
    ledger.complete(KEY, completed())
    assert record.state is FileState.READY and ledger.held_bytes == 5
    ledger.dispatch(KEY, unit_id=7)
    assert (record.state, record.unit_id, ledger.held_bytes) == (FileState.UPLOADING, 7, 5)
    ledger.retry_later(KEY, at=100.0)
    assert record.state is FileState.WAITING_TO_RETRY and ledger.held_bytes == 5
    assert ledger.due(99.0) == []
    assert ledger.due(100.0) == [record] and record.state is FileState.READY
    ledger.dispatch(KEY, unit_id=8)
    ledger.settle(KEY, FileState.DONE)
    assert record.state is FileState.DONE and not ledger.busy(KEY)
    assert ledger.held_bytes == 0
    assert ("sub/a.bin", file_generation(KEY[1])) in ledger.known_done


@pytest.mark.parametrize("walk, refused", [
    ([], "dispatch"),                      # assembling: not complete yet
    ([], "retry_later"),
    (["complete"], "release"),             # ready files are not stale partials
    (["complete"], "complete"),
    (["complete"], "settle"),              # only an upload (or reassembly) settles
    (["complete", "dispatch"], "dispatch"),
    (["release"], "release"),
])
def test_transitions_the_machine_refuses(walk, refused) -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    steps = {"complete": lambda: ledger.complete(KEY, completed()),
             "release": lambda: ledger.release(KEY),
             "dispatch": lambda: ledger.dispatch(KEY, 1),
             "retry_later": lambda: ledger.retry_later(KEY, 0.0),
             "settle": lambda: ledger.settle(KEY, FileState.DONE)}
    for step in walk:
        steps[step]()
    with pytest.raises(LedgerError):
        steps[refused]()


def test_a_released_partial_may_still_complete_and_be_found() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.release(KEY)
    assert ledger.get(KEY).state is FileState.RELEASED and ledger.get(KEY).holds_commit
    ledger.complete(KEY, completed())
    assert ledger.get(KEY).state is FileState.READY
    other = ("b.bin", b"\x02" * 64)
    ledger.open(other)
    ledger.release(other)
    ledger.settle(other, FileState.DONE)  # found in Girder while released
    assert not ledger.busy(other)


def test_forget_drops_any_state_and_its_bytes() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.complete(KEY, completed(size=9))
    ledger.dispatch(KEY, 1)
    ledger.retry_later(KEY, 5.0)
    assert ledger.held_bytes == 9
    assert ledger.forget(KEY).state is FileState.WAITING_TO_RETRY
    assert ledger.held_bytes == 0 and not ledger.busy(KEY) and ledger.forget(KEY) is None
    assert ledger.count(*FileState) == 0


def test_routes_of_a_message() -> None:
    done = ("done.bin", b"\x03" * 64)
    ledger = FileLedger(known_done={(done[0], file_generation(done[1]))})
    assert ledger.route(done, reread=True) is Route.DONE_BEFORE
    assert ledger.route(done, reread=False) is Route.ASSEMBLE_AGAIN
    assert ledger.route(KEY, reread=False) is Route.ASSEMBLE
    ledger.open(KEY)
    assert ledger.route(KEY, reread=True) is Route.ASSEMBLE  # busy


def test_a_file_whose_upload_failed_for_good_is_rebuilt_when_produced_again() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.complete(KEY, completed())
    ledger.dispatch(KEY, 1)
    ledger.settle(KEY, FileState.FAILED)
    assert ledger.failed_for_good(KEY) and not ledger.is_known_done(KEY)
    # Never "already in Girder": a new production (or a re-read) rebuilds it, holding.
    assert ledger.route(KEY, reread=False) is Route.ASSEMBLE
    assert ledger.route(KEY, reread=True) is Route.ASSEMBLE
    assert ledger.open(KEY).role is Role.FIRST and not ledger.failed_for_good(KEY)


def test_a_file_skipped_as_different_is_done_but_not_in_girder() -> None:
    """Skipped because another file of that name was there: its fate is durable (a
    re-read is done), but produced again it must hold its commit (the replace a later
    run tries may fail, and must then be retried)."""
    ledger = FileLedger(known_in_girder=set())
    ledger.open(KEY)
    ledger.complete(KEY, completed())
    ledger.dispatch(KEY, 1)
    ledger.settle(KEY, FileState.DONE, in_girder=False)
    assert ledger.route(KEY, reread=True) is Route.DONE_BEFORE
    assert ledger.route(KEY, reread=False) is Route.ASSEMBLE
    other = ("o.bin", b"\x05" * 64)
    ledger.open(other)
    ledger.settle(other, FileState.DONE)
    assert ledger.route(other, reread=False) is Route.ASSEMBLE_AGAIN


def test_a_rejected_file_is_not_remembered_as_failed_upload() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.settle(KEY, FileState.FAILED)  # bad chunk or mismatched hash
    assert not ledger.failed_for_good(KEY)


def test_repeats_register_only_after_the_first_copy_settles() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.count_repeat(KEY, 2, 1, [1])  # chunk 1 read twice
    ledger.count_repeat(KEY, 2, 2, None)
    ledger.count_repeat(KEY, 2, 2, None)  # chunk 2 twice: a second copy is whole
    ledger.count_repeat(KEY, 3, 1, None)  # another chunking: not a copy of this one
    assert ledger.repeats_due(KEY) == []  # the first copy is not settled yet
    ledger.complete(KEY, completed())
    ledger.dispatch(KEY, 1)
    ledger.settle(KEY, FileState.DONE)
    assert ledger.route(KEY, reread=False) is Route.COUNT_REPEAT
    [first] = ledger.repeats_due(KEY)
    assert first.data is None and ledger.repeats_due(KEY) == []


def test_lookups_are_handed_out_once_and_again_only_when_unanswered() -> None:
    ledger = FileLedger()
    ledger.open(KEY)
    ledger.want_lookup(KEY, 10.0)
    ledger.want_lookup(KEY, 0.0)  # once per record
    assert ledger.take_lookups(9.0) == [] and ledger.take_lookups(10.0) == [KEY]
    assert ledger.take_lookups(99.0) == [] and ledger.lookups_wanted == 0
    ledger.lookup_unanswered(KEY, 20.0)
    assert ledger.take_lookups(20.0) == [KEY]
    ledger.lookup_unanswered(KEY, 30.0)
    ledger.forget(KEY)
    assert ledger.lookups_wanted == 0


def test_repeat_counter_agrees_with_counting_by_hand() -> None:
    counter = RepeatCounter(3, [1, 2])
    for chunk_i, whole in [(3, 1), (1, 1), (2, 1), (1, 1), (3, 2), (2, 2), (3, 3)]:
        counter.add(chunk_i)
        assert counter.whole == whole
    assert counter.take_due() == 2 and counter.take_due() == 0


def test_repeat_counter_costs_nothing_per_claimed_chunk() -> None:
    started = time.perf_counter()
    counter = RepeatCounter(2 ** 62, [1])
    for chunk_i in range(1, 20_001):
        counter.add(chunk_i)
    elapsed = time.perf_counter() - started
    print(f"20,000 chunks of a file claiming 2**62 chunks counted in {elapsed * 1e3:.1f} ms")
    assert counter.whole == 0
