"""Unit tests for girder_upload_stream.loop.runner (the polling loop, with fake Kafka and
fake upload tasks: nothing runs)."""

from __future__ import annotations


import pytest

from girder_upload_stream.loop.runner import StopSignal, stop_on_signals
from girder_upload_stream.shared_types import Outcome
from tests.unit.fakes import (TOPIC, Clock, FakeGroup, Job, MiB, Submitter, put_file)
from tests.unit.fakes import make_runner as make

# ---------------------------------------------------------------- one round


def test_step_reads_submits_and_never_waits_for_uploads() -> None:
    runner, group, submit = make()
    put_file(group, b"a" * 20, "a.bin", [0, 1])
    assert runner.step() == 3
    assert submit.files() == ["a.bin"]
    for i in range(5):  # the upload never finishes; every step still returns
        put_file(group, bytes([i]) * 4, f"s{i}.bin", [2])
        assert runner.step() == 1
    assert group.polls == 6
    assert submit.files() == ["a.bin"] + [f"s{i}.bin" for i in range(5)]
    # Nothing durable yet: each partition committed at its first (pending) message.
    assert group.committed == {(TOPIC, 0): 0, (TOPIC, 1): 0, (TOPIC, 2): 0}
    assert runner.processor.inflight_units == 6


def test_commits_follow_durable_files_only() -> None:
    runner, group, submit = make()
    put_file(group, b"x" * 16, "x.bin", [0, 1])   # p0@0, p1@0
    put_file(group, b"y" * 4, "y.bin", [0])       # p0@1
    runner.step()
    hx, hy = sorted(submit.handles, key=lambda h: h.unit.files[0].rel_path)
    assert group.committed == {(TOPIC, 0): 0, (TOPIC, 1): 0}
    hy.finish()
    runner.step()
    assert group.committed == {(TOPIC, 0): 0, (TOPIC, 1): 0}  # x holds p0@0 and p1@0
    hx.finish(Outcome.SKIPPED_IDENTICAL)
    runner.step()
    assert group.committed == {(TOPIC, 0): 2, (TOPIC, 1): 1}
    commits = len(group.commits)
    runner.step()
    assert len(group.commits) == commits  # nothing new: no empty commit


def test_commit_interval_is_respected() -> None:
    clock = Clock()
    runner, group, _ = make(clock=clock, submit=Submitter(auto=Outcome.UPLOADED),
                            commit_interval_seconds=5.0)
    put_file(group, b"c" * 4, "c.bin", [0])
    runner.step()
    assert group.commits == []
    clock.now += 5
    runner.step()
    assert group.commits == [{(TOPIC, 0): 1}]


def test_transient_failure_is_retried_and_committed_only_after_success() -> None:
    clock = Clock()
    runner, group, submit = make(clock=clock, retry_delay_seconds=5.0)
    put_file(group, b"r" * 4, "r.bin", [3])
    runner.step()
    submit.handles[0].finish(Outcome.FAILED_TRANSIENT)
    runner.step()
    assert group.committed == {(TOPIC, 3): 0}
    assert len(submit.handles) == 1
    clock.now += 5
    runner.step()
    assert len(submit.handles) == 2
    submit.handles[1].crash(RuntimeError("girder down"))  # task failed after retries
    runner.step()
    assert group.committed == {(TOPIC, 3): 0}
    clock.now += 5
    runner.step()
    submit.handles[2].finish()
    runner.step()
    assert group.committed == {(TOPIC, 3): 1}
    assert submit.files() == ["r.bin"] * 3


def test_pause_when_memory_budget_exceeded_and_resume_after() -> None:
    runner, group, submit = make(memory_budget_bytes=MiB)
    put_file(group, b"B" * (MiB + 100), "big.bin", [0], size=64 * 1024)
    runner.step()
    assert runner.processor.bytes_held == MiB + 100  # uploading, still in RAM
    assert group.paused
    put_file(group, b"s" * 4, "small.bin", [1])
    runner.step()
    assert group.paused and submit.files() == ["big.bin"]  # nothing fetched
    submit.handles[0].finish()
    runner.step()
    assert not group.paused
    runner.step()  # fetching again
    assert submit.files() == ["big.bin", "small.bin"]
    assert group.pauses[:2] == [True, True] and group.pauses[-1] is False


def test_no_pause_deadlock_when_only_files_in_progress_hold_memory() -> None:
    """Pausing can only help while uploads are pending (they free memory); when files
    still assembling hold the memory, only new messages can complete them."""
    runner, group, submit = make(memory_budget_bytes=MiB)
    [last] = put_file(group, b"P" * (2 * MiB + 100), "partial.bin", [0], size=64 * 1024,
                      skip={33})
    runner.step()
    assert runner.processor.bytes_held > MiB
    group.put(*last)
    for _ in range(3):
        runner.step()
    assert submit.files() == ["partial.bin"]


# ---------------------------------------------------------------- stop conditions


def test_idle_stop_only_when_nothing_is_in_flight() -> None:
    clock = Clock()
    runner, group, submit = make(clock=clock, max_idle_seconds=10.0)
    put_file(group, b"i" * 4, "i.bin", [0])
    runner.step()
    assert runner._stop_reason() is None
    clock.now += 11
    runner.step()
    assert runner._stop_reason() is None  # the upload is still running
    submit.handles[0].finish()
    runner.step()
    reason = runner._stop_reason()
    assert reason is not None and "no new message for 10s" in reason


def test_idle_time_counts_from_the_last_message() -> None:
    clock = Clock()
    runner, group, submit = make(clock=clock, max_idle_seconds=10.0)
    clock.now += 8
    put_file(group, b"i" * 4, "i.bin", [0])
    runner.step()  # a message at t+8
    submit.handles[0].finish()
    clock.now += 8
    runner.step()
    assert runner._stop_reason() is None
    clock.now += 2
    assert runner._stop_reason() is not None


def test_idle_does_not_count_without_assignment() -> None:
    clock = Clock()
    group = FakeGroup()
    group.assignment = []
    runner, group, _ = make(group, clock=clock, max_idle_seconds=1.0)
    clock.now += 5
    runner.step()
    assert runner._stop_reason() is None


def test_run_stops_when_idle_and_returns_a_summary() -> None:
    jobs = [Job()]
    runner, group, _ = make(clock=Clock(step=0.5), jobs=jobs,
                            submit=Submitter(auto=Outcome.UPLOADED), max_idle_seconds=5.0)
    put_file(group, b"d" * 20, "d.bin", [0, 1, 2])
    summary = runner.run()
    assert "no new message" in summary.stopped_because
    assert summary is runner.summary
    assert summary.counters["files_uploaded"] == 1
    assert summary.counters["messages_read"] == 3
    assert summary.pending_messages == 0
    assert group.committed == {(TOPIC, 0): 1, (TOPIC, 1): 1, (TOPIC, 2): 1}
    assert group.closed
    assert jobs[0].ticks[-1] is True and jobs[0].ticks.count(True) == 1
    assert len(jobs[0].ticks) > 2


def test_run_stops_at_max_runtime_even_while_busy(timing) -> None:
    timing(shutdown_grace_seconds=1.0)
    runner, group, _ = make(clock=Clock(step=0.25), max_runtime_seconds=3.0)
    put_file(group, b"m" * 4, "m.bin", [0])
    summary = runner.run()
    assert summary.stopped_because == "max_runtime_seconds (3) reached"
    assert summary.pending_messages == 1  # its upload never ended: not committed
    assert group.committed == {(TOPIC, 0): 0}
    assert 3.0 <= summary.seconds < 10.0
    assert group.closed


def test_stop_requested_before_run() -> None:
    runner, group, _ = make(clock=Clock(step=0.1))
    runner.stop.request("test")
    summary = runner.run()
    assert summary.stopped_because == "stop requested"
    assert group.polls >= 1 and group.closed


def test_stop_requested_from_a_side_job() -> None:
    class Stopper(Job):
        def tick(self, runner, final: bool = False) -> None:
            super().tick(runner, final)
            if len(self.ticks) == 3:
                runner.stop.request("enough")

    job = Stopper()
    runner, _, _ = make(clock=Clock(step=0.1), jobs=[job])
    summary = runner.run()
    assert summary.stopped_because == "stop requested"
    assert job.ticks == [False, False, False, True]
    assert runner.stop.is_set() and runner.stop.reason == "enough"


# ---------------------------------------------------------------- shutdown


def test_shutdown_waits_for_uploads_then_commits_and_closes(timing) -> None:
    timing(shutdown_grace_seconds=50.0)
    job = Job()
    runner, group, submit = make(clock=Clock(step=0.1), jobs=[job],
                                 commit_interval_seconds=1000.0)
    put_file(group, b"w" * 12, "w.bin", [0, 1])
    runner.step()
    submit.handles[0].done_after = 4  # finishes during the grace period
    polls = group.polls
    summary = runner.shutdown("test")
    assert group.pauses[-1] is True
    assert group.polls > polls  # kept polling (group membership) while waiting
    assert group.commits == [{(TOPIC, 0): 1, (TOPIC, 1): 1}]
    assert job.ticks[-1] is True
    assert group.closed
    assert summary.stopped_because == "test"
    assert summary.counters["files_uploaded"] == 1
    assert summary.pending_messages == 0


def test_shutdown_gives_up_after_the_grace_period(timing) -> None:
    timing(shutdown_grace_seconds=2.0)
    runner, group, submit = make(clock=Clock(step=0.1))
    put_file(group, b"n" * 4, "never.bin", [0])
    put_file(group, b"d" * 4, "done.bin", [1])
    runner.step()
    for handle in submit.handles:
        if handle.unit.files[0].rel_path == "done.bin":
            handle.done_after = 3
    summary = runner.shutdown("bye")
    assert group.committed == {(TOPIC, 0): 0, (TOPIC, 1): 1}  # never.bin stays pending
    assert summary.pending_messages == 1
    assert group.closed
    assert 10 <= group.polls <= 30  # ~2 s of 0.1 s ticks, not for ever


def test_on_revoke_commits_then_forgets() -> None:
    runner, group, submit = make(commit_interval_seconds=1000.0)
    put_file(group, b"v" * 4, "v.bin", [1])
    put_file(group, b"k" * 16, "k.bin", [1, 2])  # k: p1@1, p2@0
    runner.step()
    for handle in submit.handles:
        if handle.unit.files[0].rel_path == "v.bin":
            handle.finish()
    runner.step()
    assert group.commits == []  # commit interval not reached
    runner.on_revoke([(TOPIC, 1)])
    assert group.commits == [{(TOPIC, 1): 1}]  # v done, k holds p1@1
    assert runner.processor.offsets.committable([(TOPIC, 1)]) == {}
    assert runner.processor.offsets.pending_count() == 1  # k@p2 only


def test_exception_in_loop_shuts_down_and_propagates() -> None:
    job = Job()
    runner, group, _ = make(clock=Clock(step=0.1), jobs=[job],
                            submit=Submitter(auto=Outcome.UPLOADED))
    put_file(group, b"e" * 4, "e.bin", [0])

    def explode(g: FakeGroup) -> None:
        if g.polls == 3:
            raise RuntimeError("broker on fire")

    group.on_poll = explode
    with pytest.raises(RuntimeError, match="broker on fire"):
        runner.run()
    assert runner.summary is not None
    assert runner.summary.stopped_because == "interrupted (RuntimeError)"
    assert group.committed == {(TOPIC, 0): 1}
    assert group.closed and job.ticks[-1] is True


def test_base_exception_in_loop_also_shuts_down() -> None:
    runner, group, _ = make(clock=Clock(step=0.1))

    def interrupt(g: FakeGroup) -> None:
        if g.polls == 2:
            raise KeyboardInterrupt

    group.on_poll = interrupt
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert runner.summary.stopped_because == "interrupted (KeyboardInterrupt)"
    assert group.closed


def test_a_stop_request_is_idempotent_and_each_run_has_its_own() -> None:
    stop = StopSignal()
    assert not stop.is_set()
    stop.request("one")
    stop.request("two")
    assert stop.is_set() and stop.reason == "one"
    first, _, _ = make()
    second, _, _ = make()
    first.stop.request("only the first")
    assert not second.stop.is_set()


def test_signals_request_a_stop_only_inside_and_the_old_handlers_come_back() -> None:
    import os
    import signal
    stop = StopSignal()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_fatal_upload_error_stops_the_run_gracefully_and_names_it() -> None:
    """A root folder given by id that is gone (GirderRootFolderGone, a FatalError): the
    run stops without raising (a flow run logs no traceback), its file stays
    uncommitted (read again by the next run), and the summary names the error."""
    from girder_upload_stream.girder.errors import GirderRootFolderGone
    runner, group, submit = make(submit=None)
    put_file(group, b"f" * 4, "f.bin", [2])
    runner.step()
    submit.handles[0].crash(GirderRootFolderGone("the root folder X (given by id) is gone"))
    summary = runner.run()
    assert isinstance(runner.fatal, GirderRootFolderGone) and group.closed
    assert summary.stopped_because == "error: the root folder X (given by id) is gone"
    assert group.committed.get((TOPIC, 2), 0) == 0
