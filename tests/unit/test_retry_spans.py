"""Unit tests of offsets rule 9: a file whose upload failed for good does not hold the
commit, but the commit metadata lists its messages, and the next run of the group
seeks back to them, rebuilds the file and tries it again."""

from __future__ import annotations

from girder_upload_stream.ledger.offsets import (MAX_FAILED_CHARS, OffsetTracker, format_metadata,
                                          parse_failed, parse_metadata, parse_spans)
from girder_upload_stream.shared_types import (FileOutcome, Outcome, PartitionInfo,
                                               RETRIED_NEXT_RUN)
from tests.unit.fakes import TOPIC, Log, encoded, outcomes, upload_all
from tests.unit.fakes import make_processor as make

P0, P1 = (TOPIC, 0), (TOPIC, 1)


def test_retry_spans_round_trip_beside_the_pending_spans() -> None:
    text = format_metadata(50, 40, [(41, 43)], [(3, 5), (44, 45)])
    assert text == "gus1:hw=50;p=1.2;f=3.2,39.1"
    assert parse_metadata(text) == 50
    assert parse_spans(text, 40) == [(41, 43)] and parse_failed(text) == [(3, 5), (44, 45)]
    assert format_metadata(50, 40, [(41, 43)], []) == "gus1:hw=50;p=1.2"
    for other in ("gus1:hw=50;p=;f=x", "gus1:hw=50;p=;f=49.5", None, "foreign"):
        assert parse_failed(other) == [], other


def test_a_long_retry_list_is_capped_and_keeps_the_oldest() -> None:
    failed = [(i * 10, i * 10 + 1) for i in range(2000)]
    text = format_metadata(30000, 29999, [], failed)
    assert len(text.split(";f=", 1)[1]) <= MAX_FAILED_CHARS
    parsed = parse_failed(text)
    assert parsed == failed[:len(parsed)] and 100 < len(parsed) < 2000


def test_the_next_run_seeks_back_to_a_failed_file_below_the_commit() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 10, format_metadata(20, 10, [(12, 13)], [(3, 5)]))
    assert tracker.take_seeks() == {P0: 3}  # back below the commit, once
    tracker.sought(P0, 3)
    assert tracker.take_seeks() == {}
    assert [o for o in range(0, 22) if tracker.skippable(P0, o)] == \
        [5, 6, 7, 8, 9, 10, 11, *range(13, 20)]
    tracker.read(P0, 3, "f")  # the failed file's messages, pending again
    tracker.read(P0, 4, "f")
    assert tracker.take_seeks() == {P0: 12}  # then on over the gap
    # The commit does not move back, and still lists the retry while it is under way
    # (so nothing changed since the last commit).
    assert tracker.failed_spans(P0, 10) == [(3, 5)] and tracker.commit_plan() == {}
    tracker.file_done("f")
    assert tracker.commit_plan() == {P0: (10, "gus1:hw=20;p=2.1")}


def test_a_commit_lists_the_retry_spans_not_yet_read_again() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 10, format_metadata(20, 10, [], [(3, 5), (7, 8)]))
    tracker.read(P0, 3, "f")
    # 4 and 7 not read yet (the consumer is at 4): both stay listed.
    assert tracker.failed_spans(P0, 10) == [(3, 5), (7, 8)]


def test_a_failed_upload_releases_the_commit_and_is_retried_by_the_next_run(log: Log) -> None:
    first = make()
    pairs = encoded(b"R" * 12, "r.bin")
    msgs = [log.put(0, *pairs[0]), log.put(1, *pairs[1]),
            log.put(0, *encoded(b"ok", "ok.bin")[0])]
    for m in msgs:
        first.handle(m)
    units = first.take_units()
    for unit in units:
        first.finish_unit(unit, [FileOutcome(f.rel_path, f.file_key,
                                             Outcome.FAILED_TERMINAL if f.rel_path == "r.bin"
                                             else Outcome.UPLOADED, "HTTP 400")
                                 for f in unit.files])
    [(_, rel, outcome)] = [c for c in first.recorder.of("file_outcome") if c[1] == "r.bin"]
    assert outcome is Outcome.FAILED_TERMINAL
    assert first.counters.files_to_retry == 1
    plan = first.offsets.commit_plan()
    assert plan == {P0: (2, "gus1:hw=2;p=;f=0.1"), P1: (1, "gus1:hw=1;p=;f=0.1")}

    # The next run of the group (on any machine): Girder takes the file now.
    second = make(known_done=set(first.known_done))
    second.assigned([PartitionInfo(TOPIC, p, *plan[(TOPIC, p)], 0) for p in (0, 1)])
    assert second.offsets.take_seeks() == {P0: 0, P1: 0}
    for tp in (P0, P1):  # the runner tells the tracker once the consumer has sought
        second.offsets.sought(tp, 0)
    for m in msgs:  # read again from offset 0 (ok.bin, done before, is recognised)
        second.handle(m)
    [unit] = second.take_units()
    assert [f.rel_path for f in unit.files] == ["r.bin"]
    second.finish_unit(unit, outcomes(unit))
    assert second.offsets.commit_plan() == {P0: (2, "gus1:hw=2;p="), P1: (1, "gus1:hw=1;p=")}


def test_messages_fetched_before_the_seek_back_are_taken_once(log: Log) -> None:
    """The next run's consumer begins at the committed offset and may fetch new messages
    before it seeks back to the failed file: those are taken once, after the seek."""
    first = make()
    failed = log.put(0, *encoded(b"R" * 5, "r.bin")[0])
    first.handle(failed)
    [unit] = first.take_units()
    first.finish_unit(unit, outcomes(unit, Outcome.FAILED_TERMINAL))
    committed, metadata = first.offsets.commit_plan()[P0]
    new = log.put(0, *encoded(b"new", "new.bin")[0])  # produced between the two runs

    second = make(known_done=set(first.known_done))
    second.assigned([PartitionInfo(TOPIC, 0, committed, metadata, 0)])
    second.handle(new)  # fetched from the committed offset, before the seek
    assert second.take_units() == [] and second.counters.messages_skipped == 1
    assert second.offsets.take_seeks() == {P0: 0}
    second.offsets.sought(P0, 0)
    for m in (failed, new):
        second.handle(m)
    units = upload_all(second)
    assert sorted(f.rel_path for u in units for f in u.files) == ["new.bin", "r.bin"]
    assert [c[1] for c in second.recorder.of("file_outcome")] == ["r.bin", "new.bin"]
    assert second.counters.files_skipped == 0
    assert second.offsets.commit_plan() == {P0: (2, "gus1:hw=2;p=")}


def test_a_partition_given_back_in_the_same_run_retries_its_failed_file(log: Log) -> None:
    """A rebalance takes the partition away (committing first) and gives it back: the
    consumer seeks back to the failed file, rebuilds it (not a duplicate of the copy it
    completed before) and holds the commit until it is uploaded."""
    proc = make()
    failed = log.put(0, *encoded(b"R" * 5, "r.bin")[0])
    proc.handle(failed)
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TERMINAL))
    plan = proc.offsets.commit_plan()
    committed, metadata = plan[P0]
    assert metadata.endswith(";f=0.1")
    proc.offsets.committed(plan)
    proc.hand_over([P0])
    proc.offsets.forget([P0])
    proc.assigned([PartitionInfo(TOPIC, 0, committed, metadata, 0)])
    assert proc.offsets.take_seeks() == {P0: 0}
    proc.offsets.sought(P0, 0)
    proc.handle(failed)
    assert proc.offsets.failed_spans(P0, committed) == [(0, 1)]  # held while rebuilt
    assert proc.offsets.commit_plan() == {}  # so nothing changes for the broker
    [unit] = proc.take_units()
    assert [f.rel_path for f in unit.files] == ["r.bin"]
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.commit_plan() == {P0: (1, "gus1:hw=1;p=")}


def test_a_pending_run_that_begins_below_the_commit_is_listed_from_it() -> None:
    """Rule 8's list starts at the committed offset: the part of a pending run below it
    (a failed file read again) is rule 9's list, never a negative distance."""
    tracker = OffsetTracker()
    tracker.assigned(P0, 2, format_metadata(2, 2, [], [(0, 1)]))
    tracker.sought(P0, 0)
    for offset in range(0, 4):
        tracker.read(P0, offset, "f")
    assert tracker.pending_spans(P0, 2) == [(2, 4)]
    assert tracker.failed_spans(P0, 2) == [(0, 2)]


def test_the_registry_says_a_failed_file_waits_for_the_next_run(log: Log) -> None:
    proc = make()
    proc.handle(log.put(0, *encoded(b"x", "x.bin")[0]))
    [unit] = proc.take_units()
    spy_reasons = []
    proc.recorder.file_outcome = lambda completed, outcome: spy_reasons.append(outcome.reason)
    proc.finish_unit(unit, [FileOutcome("x.bin", unit.file_keys[0], Outcome.FAILED_TERMINAL,
                                        "HTTP 403: forbidden")])
    assert spy_reasons == [f"HTTP 403: forbidden; {RETRIED_NEXT_RUN}"]


def test_a_file_produced_again_is_not_listed_for_retry(log: Log) -> None:
    """A second production holds nothing: Girder had its content when it began."""
    proc = make()
    pairs = encoded(b"again", "a.bin")
    proc.handle(log.put(0, *pairs[0]))
    upload_all(proc)
    proc.handle(log.put(1, *pairs[0]))  # produced again after it was done
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TERMINAL))
    assert proc.offsets.failed_spans(P1, 1) == []


def test_a_file_skipped_as_different_and_produced_again_is_retried_when_its_replace_fails(
        log: Log) -> None:
    """Found by re-creating OpenMSIStream's replace case: a version skipped because
    another was in Girder is not "in Girder"; produced again (a later run with
    --replace_existing), it holds its commit, and a failed replace is retried."""
    proc = make()
    [pair] = encoded(b"version 2", "v.txt", size=64)
    proc.handle(log.put(0, *pair))
    upload_all(proc, Outcome.SKIPPED_DIFFERENT)
    proc.handle(log.put(1, *pair))  # produced again
    assert proc.offsets.committable()[P1] == 0  # held
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TERMINAL))
    assert proc.offsets.failed_spans(P1, 1) == [(0, 1)]
    assert proc.counters.files_to_retry == 1
