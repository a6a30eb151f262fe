"""Unit tests for girder_upload_stream.ledger.offsets (the at-least-once commit rule)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from girder_upload_stream.ledger.offsets import OffsetTracker

P0, P1, P2 = ("t", 0), ("t", 1), ("t", 2)


def commit_all(tracker: OffsetTracker) -> dict:
    """What a runner does: ask, 'commit' (the broker accepts everything), remember."""
    offsets = tracker.committable()
    tracker.committed(offsets)
    return offsets


# ---------------------------------------------------------------- basics


def test_nothing_read_nothing_committable() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() == {}
    assert tracker.committable([P0]) == {}
    assert tracker.pending_count() == 0


def test_done_messages_commit_one_past_the_highest_read() -> None:
    tracker = OffsetTracker()
    for offset in (0, 1, 2):
        tracker.read(P0, offset)
    tracker.read(P1, 7)
    assert tracker.committable() == {P0: 3, P1: 8}
    assert tracker.pending_count() == 0


def test_pending_message_holds_back_its_partition_only() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0)
    tracker.read(P0, 1, "a")
    tracker.read(P0, 2)
    tracker.read(P1, 0)
    tracker.read(P1, 1)
    assert tracker.committable() == {P0: 1, P1: 2}
    assert tracker.has_file("a")
    assert tracker.pending_count() == 1


def test_file_done_releases_every_message_of_the_file_across_partitions() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 5, "a")
    tracker.read(P1, 3, "a")
    tracker.read(P1, 4, "b")
    tracker.read(P0, 6, "a")
    assert tracker.committable() == {P0: 5, P1: 3}
    assert tracker.file_done("a") == 3
    assert not tracker.has_file("a")
    assert tracker.committable() == {P0: 7, P1: 4}
    assert tracker.file_done("b") == 1
    assert tracker.committable() == {P0: 7, P1: 5}
    assert tracker.pending_count() == 0


def test_file_done_of_unknown_or_finished_file_releases_nothing() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0, "a")
    assert tracker.file_done("zzz") == 0
    assert tracker.file_done("a") == 1
    assert tracker.file_done("a") == 0
    assert tracker.committable() == {P0: 1}


def test_lowest_pending_offset_wins_whatever_the_reading_order() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 10, "late")
    tracker.read(P0, 4, "early")  # re-delivered lower offset
    tracker.read(P0, 12)
    assert tracker.committable() == {P0: 4}
    tracker.file_done("early")
    assert tracker.committable() == {P0: 10}
    tracker.file_done("late")
    assert tracker.committable() == {P0: 13}


def test_committable_returns_only_changes_and_only_moves_forward() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0)
    tracker.read(P1, 0)
    assert commit_all(tracker) == {P0: 1, P1: 1}
    assert tracker.committable() == {}  # nothing new
    tracker.read(P0, 1)
    assert tracker.committable() == {P0: 2}  # P1 unchanged: not returned
    tracker.committed({P0: 2})
    # A pending message below the committed offset (re-delivered) never moves it back.
    tracker.read(P0, 0, "old")
    assert tracker.committable() == {}
    tracker.file_done("old")
    assert tracker.committable() == {}
    tracker.read(P0, 2)
    assert tracker.committable() == {P0: 3}


def test_committed_keeps_the_highest_offset_the_broker_accepted() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.read(P0, offset)
    tracker.committed({P0: 5})
    tracker.committed({P0: 2})  # a late, older acknowledgement
    assert tracker.committable() == {}


def test_failed_commit_stays_committable() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0)
    tracker.read(P1, 0)
    assert tracker.committable() == {P0: 1, P1: 1}
    tracker.committed({P0: 1})  # the broker accepted only P0
    assert tracker.committable() == {P1: 1}


def test_committable_limited_to_the_partitions_asked_for() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0)
    tracker.read(P1, 0)
    assert tracker.committable([P1]) == {P1: 1}
    assert tracker.committable([P2]) == {}  # never read: nothing to say
    assert tracker.committable([]) == {}


def test_forget_drops_revoked_partitions_and_their_pending_messages() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0, "a")
    tracker.read(P1, 0, "a")
    tracker.read(P1, 1, "b")
    tracker.read(P2, 0)
    commit_all(tracker)
    tracker.forget([P1])
    assert tracker.pending_count() == 1  # a@P0 only
    assert tracker.has_file("a")
    assert not tracker.has_file("b")  # all of b's messages were on P1
    assert tracker.committable([P1]) == {}
    assert tracker.file_done("a") == 1
    assert commit_all(tracker) == {P0: 1}
    # Reassigned later: starts from scratch, also its commit memory.
    tracker.read(P1, 0)
    assert tracker.committable() == {P1: 1}


def test_forget_also_forgets_what_was_committed() -> None:
    """The next owner may have committed anything meanwhile: after a reassignment the
    tracker commits what it reads, even below its own earlier commit."""
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.read(P0, offset)
    assert commit_all(tracker) == {P0: 5}
    tracker.forget([P0])
    tracker.read(P0, 2, "x")  # reassigned, read again from an older committed offset
    assert tracker.committable() == {P0: 2}
    tracker.file_done("x")
    assert tracker.committable() == {P0: 3}


def test_forget_of_unknown_partition_is_harmless() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0, "a")
    tracker.forget([P1, ("other", 9)])
    assert tracker.committable() == {P0: 0}
    assert tracker.has_file("a")


def test_interleaving_many_files_over_partitions() -> None:
    rng = random.Random(7)
    tracker = OffsetTracker()
    partitions = [("t", p) for p in range(4)]
    next_offset = {tp: 0 for tp in partitions}
    where: dict[str, list[tuple]] = {}
    for i in range(300):
        name = f"f{i % 40}"
        tp = rng.choice(partitions)
        tracker.read(tp, next_offset[tp], name)
        where.setdefault(name, []).append((tp, next_offset[tp]))
        next_offset[tp] += 1
    names = sorted(where)
    rng.shuffle(names)
    for n_done, name in enumerate(names, start=1):
        assert tracker.file_done(name) == len(where[name])
        remaining = [pos for other in names[n_done:] for pos in where[other]]
        for tp in partitions:
            lows = [offset for p, offset in remaining if p == tp]
            expected = min(lows) if lows else next_offset[tp]
            assert tracker.committable([tp]).get(tp, expected) == expected
        commit_all(tracker)
    assert tracker.pending_count() == 0
    assert tracker.committable() == {}
    commit_all(tracker)
    assert tracker._committed == next_offset


# ---------------------------------------------------------------- property

partition_ids = st.integers(min_value=0, max_value=3)
events = st.lists(
    st.one_of(
        # read: (partition, file id, done immediately?)
        st.tuples(st.just("read"), partition_ids, st.integers(0, 7), st.booleans()),
        st.tuples(st.just("done"), st.integers(0, 7)),
        st.tuples(st.just("commit")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_committable_never_passes_a_message_whose_file_is_not_done(ops) -> None:
    tracker = OffsetTracker()
    next_offset: dict[tuple, int] = {}
    pending: dict[tuple, dict[int, int]] = {}  # model: tp -> offset -> file id
    last_commit: dict[tuple, int] = {}
    for op in ops:
        if op[0] == "read":
            _, p, file_id, immediate = op
            tp = ("t", p)
            offset = next_offset.get(tp, 0)
            next_offset[tp] = offset + 1
            if immediate:
                tracker.read(tp, offset)
            else:
                tracker.read(tp, offset, file_id)
                pending.setdefault(tp, {})[offset] = file_id
        elif op[0] == "done":
            file_id = op[1]
            tracker.file_done(file_id)
            for offsets in pending.values():
                for offset in [o for o, f in offsets.items() if f == file_id]:
                    del offsets[offset]
        else:
            offsets = tracker.committable()
            for tp, offset in offsets.items():
                assert offset > last_commit.get(tp, -1)  # only forward, only changes
            tracker.committed(offsets)
            last_commit.update(offsets)
        for tp, offset in tracker.committable().items():
            lows = pending.get(tp)
            if lows:
                assert offset == min(lows)
            else:
                assert offset == next_offset[tp]
        for tp, committed in last_commit.items():
            if pending.get(tp):
                assert committed <= min(pending[tp])
    # Finish every file: everything becomes committable up to the end.
    for file_id in range(8):
        tracker.file_done(file_id)
    expected = {tp: offset for tp, offset in next_offset.items()
                if offset > last_commit.get(tp, -1)}
    assert tracker.committable() == expected
    assert tracker.pending_count() == 0
