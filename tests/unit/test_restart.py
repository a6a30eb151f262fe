"""Unit tests of the restart rule (offsets rules 4 and 7; rule 8 is in test_restart_spans):
watermark, re-reads told from new messages, second productions, Girder lookups of
unknown re-read files, stale partial files, messages gone from the topic."""

from __future__ import annotations

import subprocess
import sys

import pytest

from girder_upload_stream import failpoints
from girder_upload_stream.wire.codec import decode_chunk
from girder_upload_stream.ledger.offsets import OffsetTracker, format_metadata, parse_metadata
from girder_upload_stream.shared_types import (FileOutcome, FileProgress, Outcome, PartitionInfo,
                                               file_generation)
from girder_upload_stream.assembly.pieces import Pieces
from tests.unit.fakes import TOPIC, Clock, Log, SpyRecorder, encoded, upload_all
from tests.unit.fakes import make_processor as make

P0, P1 = (TOPIC, 0), (TOPIC, 1)


class RestartSpy(SpyRecorder):
    def file_found(self, progress: FileProgress) -> None:
        self.calls.append(("file_found", progress.rel_path))

    def file_stale(self, progress: FileProgress, reason: str) -> None:
        self.calls.append(("file_stale", progress.rel_path, reason))

    def file_dropped(self, progress: FileProgress) -> None:
        self.calls.append(("file_dropped", progress.rel_path))

    def messages_gone(self, partition: int, first: int, end: int) -> None:
        self.calls.append(("messages_gone", partition, first, end))


def info(partition: int, committed: int | None, high: int | None, low: int = 0):
    return PartitionInfo(TOPIC, partition, committed,
                         None if high is None else format_metadata(high), low)


# ---------------------------------------------------------------- offsets


def test_metadata_round_trip_and_foreign_metadata() -> None:
    assert parse_metadata(format_metadata(1234)) == 1234
    for foreign in (None, "", "hello", "gus1:hw=", "gus1:hw=-3", "gus1:hw=12x"):
        assert parse_metadata(foreign) is None


def test_reread_span_comes_from_commit_and_metadata() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 10, format_metadata(25))
    tracker.assigned(P1, 7, "written by someone else")
    assert tracker.is_reread(P0, 10) and tracker.is_reread(P0, 24)
    assert not tracker.is_reread(P0, 25)
    assert not tracker.is_reread(P1, 7)  # foreign commit: nothing counts as re-read
    assert not tracker.is_reread((TOPIC, 2), 0)  # never assigned: new
    tracker.assigned((TOPIC, 3), None, None)  # never committed
    assert not tracker.is_reread((TOPIC, 3), 0)


def test_commit_plan_carries_the_high_watermark_and_never_shrinks_it() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 10, format_metadata(25))  # an older commit: no span list
    tracker.read(P0, 10, "pending-file")
    tracker.read(P0, 11)
    # The safe offset stays 10, but the metadata must keep 25 (not 12): a crash now
    # must still treat 10..24 as re-read, and read 12..24 again (not read yet).
    assert tracker.committable() == {}
    plan = tracker.commit_plan()
    assert plan == {P0: (10, format_metadata(25, 10, [(10, 11), (12, 25)]))}
    tracker.committed(plan)
    assert tracker.commit_plan() == {}
    for offset in range(12, 30):
        tracker.read(P0, offset)
    plan = tracker.commit_plan()
    assert plan == {P0: (10, format_metadata(30, 10, [(10, 11)]))}  # grown watermark
    tracker.committed(plan)
    assert tracker.commit_plan() == {}
    tracker.file_done("pending-file")
    assert tracker.commit_plan() == {P0: (30, format_metadata(30, 30, []))}


def test_forget_drops_the_reread_span() -> None:
    tracker = OffsetTracker()
    tracker.assigned(P0, 3, format_metadata(9))
    tracker.forget([P0])
    assert not tracker.is_reread(P0, 5)


# ---------------------------------------------------------------- pipeline


def crashed_first_run():
    """A first run that uploads f (chunks on p0@1 and p1@0) while g (p0@0, p0@2) waits
    for its last chunk; returns the log, messages, commits and the processed set."""
    log = Log()
    g1, g2, g3 = encoded(b"G" * 24, "g.bin")
    f1, f2 = encoded(b"F" * 16, "f.bin")
    first = make()
    msgs = [log.put(0, *g1), log.put(0, *f1), log.put(1, *f2), log.put(0, *g2)]
    for m in msgs:
        first.handle(m)
    upload_all(first)
    plan = first.offsets.commit_plan()
    assert plan == {P0: (0, format_metadata(3, 0, [(0, 1), (2, 3)])),
                    P1: (1, format_metadata(1, 1, []))}
    return log, msgs, g3, set(first.known_done)


def test_restart_with_registry_rereads_known_files_as_done() -> None:
    log, msgs, g3, done = crashed_first_run()
    second = make(known_done=done, recorder=RestartSpy())
    second.assigned([info(0, 0, 3), info(1, 1, 1)])
    for m in [msgs[0], msgs[1], msgs[3]]:  # p0 is re-read from 0
        second.handle(m)
    second.handle(log.put(0, *g3))
    units = upload_all(second)
    assert [f.rel_path for u in units for f in u.files] == ["g.bin"]  # f is not rebuilt
    assert second.offsets.commit_plan() == {P0: (4, format_metadata(4, 4, []))}
    assert second.take_probes() == []  # the registry knew f: no Girder lookup


def test_restart_without_registry_asks_girder_and_a_found_file_is_done() -> None:
    log, msgs, g3, _ = crashed_first_run()
    spy = RestartSpy()
    second = make(recorder=spy)  # another machine: no registry at all
    second.assigned([info(0, 0, 3), info(1, 1, 1)])
    for m in [msgs[0], msgs[1], msgs[3]]:
        second.handle(m)
    probes = second.take_probes()
    assert sorted(k[0] for k in probes) == ["f.bin", "g.bin"]
    assert second.take_probes() == []  # asked once while the lookup runs
    f_key = next(k for k in probes if k[0] == "f.bin")
    g_key = next(k for k in probes if k[0] == "g.bin")
    second.probe_result(f_key, True)
    second.probe_result(g_key, False)
    assert spy.of("file_found") == [("file_found", "f.bin")]
    assert second.counters.files_found_in_girder == 1
    # f no longer holds p0@1: only g (p0@0) does, until its last chunk comes.
    second.handle(log.put(0, *g3))
    assert [f.rel_path for u in upload_all(second) for f in u.files] == ["g.bin"]
    assert second.offsets.commit_plan() == {P0: (4, format_metadata(4, 4, []))}


def test_unanswered_girder_lookup_is_asked_again_later() -> None:
    clock = Clock()
    log = Log()
    a1, _ = encoded(b"A" * 16, "a.bin")
    proc = make(clock=clock, retry_delay=5)
    proc.assigned([info(0, 0, 10)])
    proc.handle(log.put(0, *a1))
    [key] = proc.take_probes()
    proc.probe_result(key, None)
    assert proc.take_probes() == []
    clock.now += 5
    assert proc.take_probes() == [key]


def test_files_the_in_progress_registry_lists_need_no_lookup() -> None:
    log = Log()
    a1, _ = encoded(b"A" * 16, "a.bin")
    gen = file_generation(decode_chunk(a1[1]).file_hash)
    proc = make(known_pending={("a.bin", gen)})
    proc.assigned([info(0, 0, 10)])
    proc.handle(log.put(0, *a1))
    assert proc.take_probes() == []


def test_a_new_chunk_of_a_file_another_program_processed_is_looked_up_at_once() -> None:
    """OpenMSIStream 1.8.8 keeps no generation in its processed rows, and commits no
    watermark: a chunk of a file it processed, read again after its commit, is new to
    us. Its other chunks are committed past, so only Girder can settle it: asked at
    once, not after the stuck-file wait; found, its message is done."""
    log = Log()
    _, y2 = encoded(b"Y" * 40, "y.dat", "run", 20)
    spy = RestartSpy()
    proc = make(recorder=spy, known_done={("run/y.dat", "")})
    proc.assigned([info(0, 0, None)])  # a foreign commit: nothing counts as re-read
    proc.handle(log.put(0, *y2))
    [key] = proc.take_probes()
    assert key[0] == "run/y.dat"
    proc.probe_result(key, True)
    assert spy.of("file_found") == [("file_found", "run/y.dat")]
    assert proc.offsets.commit_plan()[P0][0] == 1


def test_a_new_file_nobody_listed_needs_no_lookup() -> None:
    log = Log()
    a1, _ = encoded(b"A" * 40, "a.bin", "", 20)
    proc = make(known_done={("other.bin", "")})
    proc.assigned([info(0, 0, None)])
    proc.handle(log.put(0, *a1))
    assert proc.take_probes() == []


def test_a_file_produced_twice_is_rebuilt_twice_without_holding_commits() -> None:
    log = Log()
    pairs = encoded(b"twice" * 5, "t.bin")
    proc = make()
    for pair in pairs:
        proc.handle(log.put(0, *pair))
    first = upload_all(proc)
    assert len(first) == 1 and first[0].known_there == set()
    # The producer runs again: new offsets, same content.
    proc.handle(log.put(1, *pairs[0]))
    assert proc.offsets.commit_plan()[P1][0] == 1  # not held while it assembles
    for pair in pairs[1:]:
        proc.handle(log.put(1, *pair))
    again = upload_all(proc, Outcome.SKIPPED_IDENTICAL)
    assert [f.rel_path for u in again for f in u.files] == ["t.bin"]
    # Girder is known to hold it: its item is looked up before any is made.
    assert again[0].known_there == {again[0].files[0].file_key}
    outcomes = proc.recorder.of("file_outcome")
    assert [o[2] for o in outcomes] == [Outcome.UPLOADED, Outcome.SKIPPED_IDENTICAL]


def test_a_listed_file_read_as_new_after_a_kill_before_the_commit_is_looked_up_first() -> None:
    """A run uploaded t.bin and saved the registry, then was killed before its commit
    (no metadata says its message was read): the next run reads it as new. Its upload
    must look the item up first: a renamed item made now, and a kill before its
    DELETE, would stay for good, as the run after settles the file by the registry."""
    log = Log()
    pairs = encoded(b"listed" * 5, "t.bin")
    generation = file_generation(decode_chunk(pairs[0][1]).file_hash)
    proc = make(known_done={("t.bin", generation)})
    for pair in pairs:
        proc.handle(log.put(0, *pair))
    units = upload_all(proc, Outcome.SKIPPED_IDENTICAL)
    assert [u.known_there for u in units] == [{units[0].files[0].file_key}]


def test_a_stray_resent_chunk_of_a_finished_file_is_dropped_when_stale() -> None:
    wall = Clock(5000.0)
    log = Log()
    pairs = encoded(b"x" * 16, "x.bin")
    spy = RestartSpy()
    proc = make(recorder=spy, stale_partial_seconds=60, wall_clock=wall)
    proc.reassembler._clock = wall  # message times on the same clock
    for pair in pairs:
        proc.handle(log.put(0, *pair))
    upload_all(proc)
    proc.handle(log.put(0, *pairs[0]))  # a producer retry, long after
    wall.now += 61
    proc.take_units()
    assert spy.of("file_dropped") == [("file_dropped", "x.bin")]
    assert proc.reassembler.in_progress() == []


def test_a_stale_partial_file_stops_holding_commits_but_may_still_complete() -> None:
    wall = Clock(5000.0)
    log = Log()
    s1, s2 = encoded(b"S" * 16, "s.bin")
    spy = RestartSpy()
    proc = make(recorder=spy, stale_partial_seconds=60, wall_clock=wall)
    proc.reassembler._clock = wall
    proc.handle(log.put(0, *s1))
    for _ in range(3):
        proc.handle(log.put(0, *encoded(b"other", "o.bin", size=64)[0]))
    upload_all(proc)
    assert proc.offsets.committable() == {P0: 0}  # s.bin holds p0@0
    wall.now += 30
    proc.take_units()
    assert spy.of("file_stale") == []
    wall.now += 31
    proc.take_units()
    [(_, rel, reason)] = spy.of("file_stale")
    assert rel == "s.bin" and "1 of 2 chunks" in reason and "released" in reason
    assert proc.offsets.committable() == {P0: 4}
    proc.take_units()
    assert len(spy.of("file_stale")) == 1  # recorded once
    proc.handle(log.put(0, *s2))  # the missing chunk arrives after all
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["s.bin"]
    assert proc.offsets.committable() == {P0: 5}


def test_a_message_without_key_is_rejected() -> None:
    log = Log()
    [(_, value)] = encoded(b"no key", "n.bin", size=64)
    proc = make()
    proc.handle(log.put(0, None, value))
    [(_, partition, offset, reason)] = proc.recorder.of("message_rejected")
    assert (partition, offset) == (0, 0) and "no key" in reason
    assert proc.offsets.committable() == {P0: 1}


def test_messages_gone_from_the_topic_are_reported() -> None:
    spy = RestartSpy()
    proc = make(recorder=spy)
    proc.assigned([info(0, 5, 9, low=7), info(1, 3, 3, low=0), info(2, None, None, low=4)])
    assert spy.of("messages_gone") == [("messages_gone", 0, 5, 7)]


# ---------------------------------------------------------------- failpoints


def test_failpoints_refuse_unknown_names_and_bad_counts() -> None:
    with pytest.raises(ValueError, match="unknown point"):
        failpoints.configure("upload.midd=1")
    with pytest.raises(ValueError, match="count"):
        failpoints.configure("upload.mid=0")
    assert failpoints.configure("") == {}
    failpoints.hit("upload.mid")  # disarmed: nothing happens


def test_a_failpoint_kills_the_process_at_the_nth_pass() -> None:
    code = ("import sys\nfrom girder_upload_stream import failpoints\n"
            "for i in range(5):\n    print(i, flush=True)\n    failpoints.hit('commit.before')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"GUS_FAILPOINTS": "commit.before=3", "PATH": ""}, timeout=60)
    assert proc.returncode == -9
    assert proc.stdout.split() == ["0", "1", "2"]


# ---------------------------------------------------------------- runner and registry


class ProbeHandle:
    def __init__(self, keys, answer) -> None:
        self.keys, self.answer, self.finished = keys, answer, False

    def done(self) -> bool:
        return self.finished

    def result(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return [(key, self.answer) for key in self.keys]


def test_runner_looks_up_reread_files_and_waits_for_lookups_before_idle_stop() -> None:
    from tests.unit.fakes import make_runner, put_file
    handles: list[ProbeHandle] = []
    runner, group, submit = make_runner(max_idle_seconds=0.0)
    runner._probe = lambda keys: handles.append(ProbeHandle(keys, True)) or handles[-1]
    runner.processor.assigned([info(0, 0, 100)])  # everything below 100 is re-read
    put_file(group, b"F" * 16, "f.bin", [0], skip={2})
    runner.step()
    assert [k[0] for h in handles for k in h.keys] == ["f.bin"]
    assert runner.busy and runner._stop_reason() is None  # the lookup is running
    handles[0].finished = True
    runner.step()
    assert not runner.busy
    assert runner.processor.counters.files_found_in_girder == 1
    assert group.committed == {P0: 1}  # f's chunk no longer holds the partition
    assert "hw=100" in group.metadata[P0]


def test_runner_retries_a_failed_lookup() -> None:
    from tests.unit.fakes import make_runner, put_file
    handles: list[ProbeHandle] = []
    runner, group, _ = make_runner()
    runner._probe = lambda keys: handles.append(
        ProbeHandle(keys, RuntimeError("girder down"))) or handles[-1]
    runner.processor.assigned([info(0, 0, 100)])
    put_file(group, b"F" * 16, "f.bin", [0], skip={2})
    runner.step()
    handles[0].finished = True
    runner.step()
    assert runner.processor.ledger.lookups_wanted  # asked again after retry_delay
    assert runner.processor.offsets.pending_count() == 1  # f still holds p0@0


def test_recorder_keeps_first_offsets_and_marks_files_whose_messages_are_gone(tmp_path):
    from girder_upload_stream.wire.codec import chunk_file
    from girder_upload_stream.registry.recording import RegistryRecorder
    from girder_upload_stream.registry.tables import STATUS_FAILED, STATUS_IN_PROGRESS, RowKey
    recorder = RegistryRecorder(tmp_path, TOPIC, "g")
    assert not recorder.had_local_state
    a = list(chunk_file(b"A" * 24, "sub", 8, filename="a.bin"))
    b = list(chunk_file(b"B" * 24, "", 8, filename="b.bin"))
    recorder.chunk_added(a[0], 0, 7)
    recorder.chunk_added(a[1], 1, 3)
    recorder.chunk_added(a[2], 0, 5)
    recorder.chunk_added(b[0], 1, 9)
    rows = {str(r.rel_filepath): r for r in recorder.in_progress.rows()}
    assert rows["sub/a.bin"].extra["first_offsets"] == {"0": 5, "1": 3}
    recorder.messages_gone(1, 2, 5)  # offsets 2..4 of p1 deleted: a needs 3, b starts at 9
    rows = {str(r.rel_filepath): r for r in recorder.in_progress.rows()}
    assert rows["sub/a.bin"].status == STATUS_FAILED
    assert "messages gone from the topic" in rows["sub/a.bin"].extra["reason"]
    assert rows["b.bin"].status == STATUS_IN_PROGRESS
    recorder.save(final=True)
    again = RegistryRecorder(tmp_path, TOPIC, "g")
    assert again.had_local_state
    gen = file_generation(b[0].file_hash)
    assert again.pending_keys() == {("b.bin", gen)}
    progress = FileProgress("b.bin", b[0].file_hash.hex(), 1, 3, 8, 8, 1.0e9, 1.0e9)
    again.file_found(progress)
    assert again.in_progress.get(RowKey("b.bin", gen)) is None
    [row] = again.processed.rows()
    assert row.extra["outcome"] == "found_in_girder" and row.n_chunks == 3


def test_a_quiet_partial_file_is_looked_up_in_girder_once() -> None:
    # A file whose first chunks were committed past just before a crash, and whose last
    # chunk lies past the last committed watermark, looks new: a quiet partial is asked.
    wall = Clock(5000.0)
    log = Log()
    q1, _ = encoded(b"Q" * 16, "q.bin")
    proc = make(stale_partial_seconds=3600, wall_clock=wall)
    proc.reassembler._clock = wall
    proc.handle(log.put(0, *q1))
    assert proc.take_probes() == []  # new, not quiet yet
    wall.now += 31
    proc.take_units()
    [key] = proc.take_probes()
    proc.probe_result(key, False)
    wall.now += 31
    proc.take_units()
    assert proc.take_probes() == []  # once


def test_a_copy_produced_again_while_the_first_uploads_is_registered_twice() -> None:
    log = Log()
    pairs = encoded(b"both" * 6, "b.bin")
    proc = make()
    for pair in pairs + pairs:  # a new group reads both productions in one batch
        proc.handle(log.put(0, *pair))
    units = upload_all(proc, Outcome.SKIPPED_IDENTICAL)
    assert [f.rel_path for u in units for f in u.files] == ["b.bin"]  # uploaded once
    assert [o[2] for o in proc.recorder.of("file_outcome")] == [Outcome.SKIPPED_IDENTICAL] * 2
    assert proc.counters.files_skipped == 2
    assert proc.offsets.committable() == {P0: 2 * len(pairs)}


def test_a_copy_produced_again_across_the_first_upload_is_counted_whole() -> None:
    log = Log()
    pairs = encoded(b"across" * 4, "c.bin")
    proc = make()
    for pair in pairs + pairs[:1]:  # the second copy begins while the first uploads ...
        proc.handle(log.put(0, *pair))
    upload_all(proc)
    assert proc.counters.files_skipped == 0
    for pair in pairs[1:]:  # ... and ends after it is in Girder
        proc.handle(log.put(1, *pair))
    assert proc.take_units() == []  # counted, not rebuilt
    assert [o[2] for o in proc.recorder.of("file_outcome")] == [
        Outcome.UPLOADED, Outcome.SKIPPED_IDENTICAL]
    assert proc.offsets.committable() == {P0: len(pairs) + 1, P1: len(pairs) - 1}


def test_interleaved_copies_of_one_file_are_each_registered() -> None:
    log = Log()
    a, b, c = encoded(b"interleaved!" * 2, "i.bin")
    proc = make()
    # Copy 2 begins before copy 1 is complete, on other partitions.
    for partition, pair in [(0, a), (1, a), (0, b), (2, c), (1, b), (3, c)]:
        proc.handle(log.put(partition, *pair))
    units = upload_all(proc)
    assert [f.rel_path for u in units for f in u.files] == ["i.bin"]  # uploaded once
    assert [o[2] for o in proc.recorder.of("file_outcome")] == [
        Outcome.UPLOADED, Outcome.SKIPPED_IDENTICAL]
    for partition, pair in [(0, a), (1, b)]:  # a third copy, incomplete: not registered
        proc.handle(log.put(partition, *pair))
    assert len(proc.recorder.of("file_outcome")) == 2
    proc.handle(log.put(2, *c))
    assert len(proc.recorder.of("file_outcome")) == 3
    assert proc.offsets.pending_count() == 0


def test_the_ledger_keeps_no_file_bytes_of_settled_files_and_forgets_old_ones() -> None:
    from girder_upload_stream.ledger.records import FileLedger, FileState
    from girder_upload_stream.shared_types import CompletedFile
    ledger = FileLedger(max_remembered=2)
    files = [CompletedFile(f"f{i}", bytes([i]) * 64, "s", 3, 1, 0.0, 0.0, 0.0,
                           Pieces([b"abc"]), None) for i in range(3)]
    for f in files:
        ledger.open(f.file_key)
        ledger.complete(f.file_key, f)
        ledger.count_repeat(f.file_key, 1, 1, [1])  # a second copy begins
        ledger.dispatch(f.file_key, 1)
        ledger.settle(f.file_key, FileState.DONE)
    assert not ledger.counting(files[0].file_key)  # forgotten (oldest)
    [due] = ledger.repeats_due(files[2].file_key)
    assert due.data is None and due.rel_path == "f2"
    assert ledger.repeats_due(files[2].file_key) == []
    assert ledger.held_bytes == 0


def test_files_settle_as_they_land_not_when_their_unit_ends() -> None:
    log = Log()
    proc = make(max_unit_files=8)
    for name in ("a.bin", "b.bin", "c.bin"):
        [(key, value)] = encoded(name.encode() * 4, name, size=64)
        proc.handle(log.put(0, key, value))
    [unit] = proc.take_units()
    first = unit.files[0]
    early = FileOutcome(first.rel_path, (first.rel_path, first.file_hash), Outcome.UPLOADED)
    proc.settle_early(unit.unit_id, early)
    assert proc.offsets.committable() == {P0: 1}  # a.bin released, b and c still held
    proc.settle_early(unit.unit_id, early)  # reported again (a retried unit): once only
    transient = FileOutcome(unit.files[1].rel_path,
                            (unit.files[1].rel_path, unit.files[1].file_hash),
                            Outcome.FAILED_TRANSIENT, "5xx")
    proc.settle_early(unit.unit_id, transient)  # the unit's own result decides
    assert proc.offsets.committable() == {P0: 1}
    proc.finish_unit(unit, [early, *(FileOutcome(f.rel_path, (f.rel_path, f.file_hash),
                                                 Outcome.UPLOADED) for f in unit.files[1:])])
    assert proc.offsets.committable() == {P0: 3}
    assert [c[1] for c in proc.recorder.of("file_outcome")] == ["a.bin", "b.bin", "c.bin"]
    assert proc.counters.files_uploaded == 3 and proc.idle


def test_runner_drains_early_outcomes() -> None:
    from tests.unit.fakes import make_runner, put_file
    reported: list = []
    runner, group, submit = make_runner(max_unit_files=8)
    runner._early_outcomes = lambda: [reported.pop(0) for _ in range(len(reported))]
    put_file(group, b"A" * 8, "a.bin", [0])
    put_file(group, b"B" * 8, "b.bin", [0])
    runner.step()
    [handle] = submit.handles
    f = handle.unit.files[0]
    reported.append((handle.unit.unit_id, FileOutcome(f.rel_path, (f.rel_path, f.file_hash),
                                                      Outcome.UPLOADED)))
    runner.step()
    assert group.committed == {P0: 1}  # before the unit ended


def test_idle_stop_waits_while_the_broker_does_not_answer() -> None:
    from tests.unit.fakes import Clock as RunnerClock, make_runner
    clock = RunnerClock(now=100.0)
    runner, group, _ = make_runner(clock=clock, max_idle_seconds=5.0)
    group.quiet_seconds = lambda: 2.0  # the broker failed 2 s ago
    group.caught_up = lambda: True
    clock.now += 6
    assert runner._stop_reason() is None  # idle time counts from the broker's problem
    group.quiet_seconds = lambda: 4.0
    clock.now += 2
    assert runner._stop_reason() is None
    group.quiet_seconds = lambda: 6.0
    clock.now += 3
    assert runner._stop_reason().startswith("no new message")


def test_idle_stop_waits_while_messages_are_behind() -> None:
    from tests.unit.fakes import Clock as RunnerClock, make_runner
    clock = RunnerClock(now=100.0)
    runner, group, _ = make_runner(clock=clock, max_idle_seconds=5.0)
    answers = [False, True]
    group.caught_up = lambda: answers.pop(0)
    clock.now += 6
    assert runner._stop_reason() is None  # not at the end: the idle timer starts again
    clock.now += 4
    assert runner._stop_reason() is None
    clock.now += 2
    assert runner._stop_reason().startswith("no new message")


def test_stripe_into_units_deals_files_in_order_and_returns_the_rest() -> None:
    from girder_upload_stream.shared_types import CompletedFile
    from girder_upload_stream.ledger.units import stripe_into_units

    def f(name: str, size: int) -> CompletedFile:
        return CompletedFile(name, name.encode().ljust(64, b"."), "s", size, 1, 0.0, 0.0,
                             0.0, None, None)
    files = [f(f"f{i}", 10) for i in range(7)]
    units, rest = stripe_into_units(files, 5, 2, 3, 1000)
    assert [u.unit_id for u in units] == [5, 6]
    assert [[x.rel_path for x in u.files] for u in units] == [["f0", "f2", "f4"],
                                                              ["f1", "f3", "f5"]]
    assert [x.rel_path for x in rest] == ["f6"]
    big = [f("huge", 5000), f("small", 10)]
    units, rest = stripe_into_units(big, 1, 1, 10, 1000)
    assert [[x.rel_path for x in u.files] for u in units] == [["huge"]] and rest == big[1:]


def test_no_more_units_than_workers_and_the_oldest_files_first() -> None:
    log = Log()
    proc = make(max_inflight_units=2, max_unit_files=2)
    for i in range(6):
        [(key, value)] = encoded(bytes([i]) * 8, f"f{i}.bin", size=64)
        proc.handle(log.put(i % 2, key, value))
    units = proc.take_units()
    assert [[f.rel_path for f in u.files] for u in units] == [["f0.bin", "f2.bin"],
                                                              ["f1.bin", "f3.bin"]]
    assert proc.take_units() == []  # both workers busy: the rest waits
    assert not proc.idle
    proc.finish_unit(units[0], [FileOutcome(f.rel_path, (f.rel_path, f.file_hash),
                                            Outcome.UPLOADED) for f in units[0].files])
    [unit] = proc.take_units()
    # Two files wait: they fill one unit, so the worker free now takes both, the oldest
    # first (one task run, not two).
    assert [f.rel_path for f in unit.files] == ["f4.bin", "f5.bin"]
    proc.finish_unit(units[1], [FileOutcome(f.rel_path, (f.rel_path, f.file_hash),
                                            Outcome.UPLOADED) for f in units[1].files])
    assert proc.take_units() == []
