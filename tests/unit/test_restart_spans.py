"""Unit tests of offsets rule 8: commits list the pending spans of ``[C, N)``, and a
restart seeks over the rest instead of reading it again."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from girder_upload_stream.ledger.offsets import (
    MAX_SPANS_CHARS, OffsetTracker, format_metadata, parse_metadata, parse_spans, spans_of,
)
from girder_upload_stream.shared_types import PartitionInfo
from tests.unit.fakes import TOPIC, Log, encoded, upload_all
from tests.unit.fakes import make_processor as make

P0 = (TOPIC, 0)


def test_spans_round_trip_and_older_or_foreign_metadata_has_none() -> None:
    spans = [(12, 13), (15, 40), (41, 42)]
    text = format_metadata(50, 12, spans)
    assert text == "gus1:hw=50;p=0.1,2.25,1.1"
    assert parse_metadata(text) == 50 and parse_spans(text, 12) == spans
    assert parse_spans(format_metadata(50, 50, []), 50) == []
    for other in (format_metadata(50), None, "", "someone else's", "gus1:hw=50;p=x.1",
                  "gus1:hw=50;p=0.0", "gus1:hw=50;p=-1.2", "gus1:hw=50;p=0.1.2",
                  "gus1:hw=50;p=0.99"):  # the last one runs past N
        assert parse_spans(other, 12) is None, other


def test_a_long_list_is_cut_and_its_last_span_runs_to_the_watermark() -> None:
    spans = [(i * 10, i * 10 + 1) for i in range(2000)]
    high = 20000
    text = format_metadata(high, 0, spans)
    assert len(text) <= MAX_SPANS_CHARS
    parsed = parse_spans(text, 0)
    assert parsed[:-1] == spans[:len(parsed) - 1]
    assert parsed[-1] == (spans[len(parsed) - 1][0], high)  # everything after: pending


def test_spans_of_groups_consecutive_offsets() -> None:
    assert list(spans_of([7, 3, 4, 5, 9])) == [(3, 6), (7, 8), (9, 10)]
    assert list(spans_of([])) == []


def test_a_restart_reads_the_spans_and_seeks_over_the_gaps() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 10, format_metadata(40, 10, [(10, 12), (20, 22)]))
    assert [o for o in range(8, 45) if tracker.skippable(P0, o)] == \
        [*range(12, 20), *range(22, 40)]
    assert tracker.take_seeks() == {}  # 10 is pending: read from the commit as usual
    tracker.read(P0, 10, "a")
    tracker.read(P0, 11, "b")
    assert tracker.take_seeks() == {P0: 20}
    tracker.sought(P0, 20)
    assert tracker.take_seeks() == {}  # asked once
    tracker.read(P0, 12)  # fetched before the seek took effect: skipped, done
    # A commit now must still list what is unread of the inherited spans (20, 21).
    assert tracker.pending_spans(P0, 10) == [(10, 12), (20, 22)]
    tracker.read(P0, 20, "a")
    tracker.read(P0, 21, "b")
    assert tracker.take_seeks() == {P0: 40}  # the rest of [C, N) was done
    tracker.file_done("a")
    assert tracker.commit_plan() == {P0: (11, format_metadata(40, 11, [(11, 12), (21, 22)]))}


def test_the_pipeline_skips_gap_messages_and_counts_them() -> None:
    log = Log()
    msgs = [log.put(0, *c) for name in ("a", "b", "c") for c in encoded(b"X" * 8, name)]
    second = make()
    second.assigned([PartitionInfo(TOPIC, 0, 0, format_metadata(3, 0, [(0, 1), (2, 3)]), 0)])
    for m in msgs:
        second.handle(m)
    assert second.counters.messages_read == 3 and second.counters.messages_skipped == 1
    assert sorted(f.rel_path for u in upload_all(second) for f in u.files) == ["a", "c"]


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_a_chain_of_crashes_never_skips_a_message_of_an_unfinished_file(seed: int) -> None:
    """Files interleaved on one partition, commits at random moments, a crash after each
    run: every commit's metadata must make a restart read every message of every file not
    done at that commit, and the chain must finish every file."""
    rng = random.Random(seed)
    n_files = rng.randint(1, 6)
    file_of = [rng.randrange(n_files) for _ in range(rng.randint(1, 50))]
    offsets_of = {f: [o for o, g in enumerate(file_of) if g == f] for f in range(n_files)}
    done: set[int] = set()
    committed, metadata = None, None
    for _run in range(8):
        tracker, seen = OffsetTracker(), set()
        tracker.assigned(P0, committed, metadata)
        position = committed or 0
        while position < len(file_of) and rng.random() < 0.95:
            if tracker.skippable(P0, position):
                assert file_of[position] in done, "a message of an unfinished file skipped"
            key = None if file_of[position] in done else file_of[position]
            tracker.read(P0, position, key)
            seen.add(position)
            position = tracker.take_seeks().get(P0, position + 1)
            tracker.sought(P0, position)
            for f in {file_of[o] for o in seen} - done:
                if set(offsets_of[f]) <= seen and rng.random() < 0.5:
                    tracker.file_done(f)
                    done.add(f)
            if rng.random() < 0.3:
                plan = tracker.commit_plan()
                tracker.committed(plan)
                if P0 in plan:
                    committed, metadata = plan[P0]
                    _check_commit(committed, metadata, file_of, done)
    # A last run without crash finishes every file.
    tracker = OffsetTracker()
    tracker.assigned(P0, committed, metadata)
    needed = {o for o in range(committed or 0, len(file_of)) if not tracker.skippable(P0, o)}
    assert {o for f in set(range(n_files)) - done for o in offsets_of[f]} <= needed


def _check_commit(committed: int, metadata: str, file_of: list[int], done: set[int]) -> None:
    fresh = OffsetTracker()
    fresh.assigned(P0, committed, metadata)
    for offset, f in enumerate(file_of):
        if f not in done:
            assert offset >= committed and not fresh.skippable(P0, offset), (offset, metadata)
