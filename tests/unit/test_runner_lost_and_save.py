"""Partitions lost (session timeout) and registry saves that fail: the runner with a fake
consumer group (issue 12, holes 6 and 7). Nothing runs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from girder_upload_stream.kafka import clients as kafka_io
from girder_upload_stream.loop import runner as runner_module
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.assembly.reassembly import Reassembler
from girder_upload_stream.registry.recording import RegistryRecorder
from girder_upload_stream.loop.runner import StreamRunner
from girder_upload_stream.shared_types import Outcome
from tests.unit.fakes import TOPIC, Clock, FakeGroup, Submitter, put_file
from tests.unit.fakes import make_runner as make
from tests.unit.fakes import run_settings as settings

P1, P2 = (TOPIC, 1), (TOPIC, 2)


class LosingGroup(FakeGroup):
    """A fake group that, at a chosen poll, reports partitions lost the way
    :class:`~girder_upload_stream.kafka.clients.ConsumerGroup` does: the callback runs inside
    poll, then the partitions leave the assignment (commits for them are refused)."""

    def __init__(self, n_partitions: int = 4) -> None:
        super().__init__(n_partitions)
        self.lose_at: tuple[int, list] | None = None
        self.on_lost = None
        self.refused: list[dict] = []

    def poll(self, max_messages: int, timeout: float = 0.2) -> list:
        if self.lose_at is not None and self.polls + 1 == self.lose_at[0]:
            lost = self.lose_at[1]
            self.on_lost(lost)
            self.assignment = [tp for tp in self.assignment if tp not in lost]
        return super().poll(max_messages, timeout)

    def commit(self, offsets: dict, sync: bool | None = None) -> dict:
        refused = {tp: o for tp, o in offsets.items() if tp not in self.assignment}
        if refused:
            self.refused.append(refused)
        return super().commit({tp: o for tp, o in offsets.items() if tp in self.assignment},
                              sync)


# ---------------------------------------------------------------- lost partitions


def _two_files(group: FakeGroup, runner: StreamRunner, submit: Submitter):
    """v.bin on p1 uploaded (committable, not committed); k.bin on p1+p2 failed
    transiently (waiting to retry)."""
    put_file(group, b"v" * 4, "v.bin", [1])
    put_file(group, b"k" * 16, "k.bin", [1, 2])  # k: p1@1, p2@0
    runner.step()
    by_name = {h.unit.files[0].rel_path: h for h in submit.handles}
    by_name["v.bin"].finish()
    by_name["k.bin"].finish(Outcome.FAILED_TRANSIENT)
    runner.step()


def test_lost_partitions_commit_nothing_and_hand_their_files_over() -> None:
    clock = Clock()
    runner, group, submit = make(LosingGroup(), clock=clock, commit_interval_seconds=1000.0,
                                 retry_delay_seconds=5.0)
    _two_files(group, runner, submit)
    assert group.commits == []  # commit interval not reached: v is committable, unsent
    runner.on_lost([P1, P2])
    assert group.commits == []  # a revoke would have committed p1@1 here
    assert runner.processor.offsets.pending_count() == 0
    assert runner.processor.offsets.committable([P1, P2]) == {}
    clock.now += 10  # past the retry delay: k.bin is not tried again, it was handed over
    runner.step()
    assert [h.unit.files[0].rel_path for h in submit.handles] == ["v.bin", "k.bin"]


def test_revoke_commits_where_lost_does_not() -> None:
    """The same state, revoked instead of lost: what is safe is committed first."""
    runner, group, submit = make(LosingGroup(), commit_interval_seconds=1000.0)
    _two_files(group, runner, submit)
    runner.on_revoke([P1, P2])
    assert group.commits == [{P1: 1, P2: 0}]


def test_partitions_lost_during_poll_are_never_committed_afterwards() -> None:
    runner, group, submit = make(LosingGroup(), submit=Submitter(auto=Outcome.UPLOADED),
                                 commit_interval_seconds=1000.0)
    group.on_lost = runner.on_lost
    put_file(group, b"b" * 8, "b.bin", [1])
    put_file(group, b"c" * 8, "c.bin", [0])
    runner.step()  # reads b and c, both uploaded: committable, not committed yet
    assert runner.processor.offsets.committable() == {P1: 1, (TOPIC, 0): 1}
    group.lose_at = (group.polls + 1, [P1])
    runner.step()  # p1 is lost inside this poll
    runner.commit()
    runner.shutdown("test")
    assert group.refused == []  # no commit for p1 was even attempted
    assert group.commits == [{(TOPIC, 0): 1}]


def test_units_uploading_at_a_loss_check_for_twins(monkeypatch) -> None:
    moved = []
    monkeypatch.setattr(runner_module, "mark_moved", moved.append)
    runner, group, submit = make(commit_interval_seconds=1000.0)
    put_file(group, b"u" * 4, "u.bin", [1])
    runner.step()
    runner.on_lost([P1])
    assert [unit.files[0].rel_path for unit in moved] == ["u.bin"]


def test_consumer_group_routes_lost_to_on_lost_and_stops_owning(monkeypatch) -> None:
    """ConsumerGroup subscribes with on_lost, and a loss reaches on_lost, not on_revoke."""
    subscribed = {}

    class FakeConsumer:
        def __init__(self, conf) -> None:
            self.conf = conf

        def subscribe(self, topics, **callbacks) -> None:
            subscribed.update(callbacks)

        def list_topics(self, topic, timeout=None):
            meta = SimpleNamespace(error=None, partitions={0: None, 1: None})
            return SimpleNamespace(topics={topic: meta})

    import confluent_kafka
    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    revoked, lost = [], []
    group = kafka_io.ConsumerGroup({"group.id": "g"}, TOPIC, on_revoke=revoked.append,
                                   on_lost=lost.append)
    group._connect()
    assert set(subscribed) == {"on_assign", "on_revoke", "on_lost"}
    group._owned.update({(TOPIC, 0), (TOPIC, 1)})
    subscribed["on_lost"](group._consumer, [SimpleNamespace(topic=TOPIC, partition=1)])
    assert lost == [[(TOPIC, 1)]] and revoked == []
    assert group.assignment == [(TOPIC, 0)]
    assert group.shared  # another member may be uploading the lost partition's files
    assert group.commit({(TOPIC, 1): (5, "")}) == {}  # not ours any more: not sent


# ---------------------------------------------------------------- failing saves


class FlakySave:
    """A save (checkpoint step 3) that raises ``failures`` times, then works."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.error = error or OSError(28, "No space left on device")

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error


def make_with_save(save, **overrides):
    run = settings(**overrides)
    clock = Clock()
    processor = StreamProcessor(Reassembler(), max_unit_files=1, clock=clock)
    group, submit = FakeGroup(), Submitter(auto=Outcome.UPLOADED)
    runner = StreamRunner(run, processor, group, submit, save=save, clock=clock)
    return runner, group, submit


def test_a_failing_save_holds_commits_and_uploads_go_on(caplog) -> None:
    save = FlakySave(failures=4)
    runner, group, submit = make_with_save(save)
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream.loop.runner"):
        for i in range(4):
            put_file(group, bytes([i]) * 4, f"f{i}.bin", [0])
            runner.step()
        assert submit.files() == [f"f{i}.bin" for i in range(4)]  # uploads went on
        assert group.commits == []  # but nothing was committed while the save failed
        put_file(group, b"z" * 4, "z.bin", [0])
        runner.step()  # the fifth save works: everything done so far is committed
    assert group.committed == {(TOPIC, 0): 5}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    assert any("commits resume" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_a_save_reporting_false_holds_commits_too() -> None:
    answers = iter([False, False, True])
    runner, group, _ = make_with_save(lambda: next(answers))
    put_file(group, b"q" * 4, "q.bin", [2])
    runner.step()
    runner.step()
    assert group.commits == []
    runner.step()
    assert group.committed == {(TOPIC, 2): 1}


@pytest.fixture
def failing_recorder(tmp_path, monkeypatch):
    """A real RegistryRecorder whose disk is full until ``recorder.disk_full = False``."""
    recorder = RegistryRecorder(tmp_path / "LOGS", TOPIC, "g")
    recorder.disk_full = True
    real_save = recorder.save

    def save(final: bool = False) -> None:
        if recorder.disk_full:
            raise OSError(28, "No space left on device", str(recorder.in_progress.path))
        real_save(final=final)

    monkeypatch.setattr(recorder, "save", save)
    return recorder


def make_recorded(recorder, **overrides):
    run = settings(**overrides)
    clock = Clock(step=0.1)
    processor = StreamProcessor(Reassembler(), recorder=recorder, max_unit_files=1, clock=clock)
    group, submit = FakeGroup(), Submitter(auto=Outcome.UPLOADED)
    runner = StreamRunner(run, processor, group, submit, save=recorder.try_save,
                          clock=clock)
    return runner, group, submit


def test_recorder_save_failure_is_logged_once_per_streak(failing_recorder, caplog) -> None:
    runner, group, submit = make_recorded(failing_recorder)
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream"):
        for i in range(3):
            put_file(group, bytes([i]) * 4, f"r{i}.bin", [1])
            runner.step()
        assert group.commits == [] and len(submit.handles) == 3
        assert failing_recorder.save_error.startswith("OSError: [Errno 28]")
        failing_recorder.disk_full = False
        runner.step()
        assert group.committed == {(TOPIC, 1): 3} and failing_recorder.save_error is None
        failing_recorder.disk_full = True  # a second streak is reported again
        put_file(group, b"s" * 4, "s.bin", [1])
        runner.step()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("offset commits wait" in e for e in errors)
    assert sum("saved again after" in r.getMessage() for r in caplog.records) == 1


def test_shutdown_with_a_failing_final_save_still_leaves_the_group(failing_recorder,
                                                                   caplog) -> None:
    runner, group, _ = make_recorded(failing_recorder)
    put_file(group, b"e" * 4, "e.bin", [3])
    runner.step()
    with caplog.at_level(logging.ERROR, logger="girder_upload_stream"):
        summary = runner.shutdown("test")
    assert group.closed and group.commits == []
    assert summary.save_error is not None and "No space left" in summary.save_error
    assert any("last save of the registries failed" in r.getMessage() for r in caplog.records)


def test_shutdown_after_a_recovered_save_reports_no_error(failing_recorder) -> None:
    runner, group, _ = make_recorded(failing_recorder)
    put_file(group, b"e" * 4, "e.bin", [3])
    runner.step()
    failing_recorder.disk_full = False
    summary = runner.shutdown("test")
    assert summary.save_error is None and group.committed == {(TOPIC, 3): 1}
    assert [str(r.rel_filepath) for r in failing_recorder.processed.rows()] == ["e.bin"]


def test_a_side_job_failing_at_shutdown_does_not_skip_the_others_or_leaving() -> None:
    class Broken:
        def tick(self, runner, final: bool = False) -> None:
            if final:
                raise OSError(5, "Input/output error")

    class Last:
        ticks: list = []

        def tick(self, runner, final: bool = False) -> None:
            self.ticks.append(final)

    last = Last()
    runner, group, _ = make(jobs=[Broken(), last], clock=Clock(step=0.1))
    runner.shutdown("bye")
    assert last.ticks[-1] is True and group.closed


def test_registry_saver_reports_a_full_disk_once(failing_recorder, caplog,
                                                 monkeypatch) -> None:
    from girder_upload_stream.registry.recording import RegistrySaver
    saver = RegistrySaver(failing_recorder, interval=0)
    with caplog.at_level(logging.ERROR, logger="girder_upload_stream"):
        for _ in range(5):
            saver.tick(None)
        saver.tick(None, final=True)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert failing_recorder.save_error is not None


def test_a_full_processed_part_that_cannot_be_written_keeps_its_rows(tmp_path,
                                                                     monkeypatch) -> None:
    from datetime import datetime

    from girder_upload_stream.registry import tables as R
    table = R.ProcessedTable(tmp_path, TOPIC, "g", "w", max_rows=2)
    real_write = table._write_locked
    monkeypatch.setattr(table, "_write_locked", lambda: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    now = datetime(2024, 1, 2, 3, 4, 5)
    for i in range(5):  # the third and later adds cannot roll over: kept, not raised
        table.add(R.ProcessedRow(f"{i}.bin", f"{i}.bin", 1, now, now))
    assert len(table.rows()) == 5
    monkeypatch.setattr(table, "_write_locked", real_write)
    assert table.save()
    assert [str(r.rel_filepath) for r in R.read_processed(tmp_path, TOPIC, "g").rows] == [
        f"{i}.bin" for i in range(5)]


def test_recorder_merges_both_in_progress_names_and_drops_processed_rows(tmp_path) -> None:
    from datetime import datetime

    from girder_upload_stream.registry import tables as R
    folder = tmp_path / "LOGS"
    folder.mkdir()
    t0, t1 = datetime(2024, 1, 1, 0, 0, 0), datetime(2024, 1, 1, 0, 0, 5)
    seed = R.InProgressTable(R.seed_in_progress_path(folder, TOPIC, "g"))
    seed.update(R.InProgressRow("a.bin", "a.bin", R.STATUS_FAILED, 1, t0, t0, "ga"))
    seed.update(R.InProgressRow("b.bin", "b.bin", R.STATUS_IN_PROGRESS, 2, t0, t0, "gb"))
    seed.save()
    omsi = R.InProgressTable(R.in_progress_path(folder, TOPIC, "g"))
    omsi.update(R.InProgressRow("c.bin", "d/c.bin", R.STATUS_FAILED, 3, t0, t0))
    omsi.save()
    done = R.ProcessedTable(folder, TOPIC, "g", "w")
    done.add(R.ProcessedRow("b.bin", "b.bin", 2, t0, t1, "gb"))  # b finished after its row
    done.save()
    recorder = RegistryRecorder(folder, TOPIC, "g")
    assert recorder.had_local_state
    assert {str(r.rel_filepath) for r in recorder.in_progress.rows()} == {"a.bin", "d/c.bin"}
    assert recorder.processed_keys() == {("b.bin", "gb")}
    assert recorder.try_save() and not R.seed_in_progress_path(folder, TOPIC, "g").exists()


@pytest.mark.parametrize("save_error, status", [(None, 0), ("OSError: [Errno 28] full", 1)])
def test_the_command_exits_non_zero_when_the_last_save_failed(monkeypatch, capsys,
                                                              save_error, status) -> None:
    import argparse

    from girder_upload_stream.cli import run as cli_run
    from girder_upload_stream.loop import session
    summary = {"stopped_because": "stop requested", "messages_read": 3, "files_uploaded": 1,
               "files_skipped": 0, "files_failed": 0, "files_found_in_girder": 0,
               "registry_save_error": save_error}
    monkeypatch.setattr(cli_run, "_run", lambda params, girder, store: summary)
    monkeypatch.setattr(cli_run, "_setup_logging", lambda args: None)
    monkeypatch.setattr(session, "prepare", lambda params, girder: session.Prepared(None, "root", None))  # no Girder, no Kafka here
    monkeypatch.setenv("GIRDER_API_KEY", "k")
    parser = argparse.ArgumentParser()
    cli_run.add_run_arguments(parser, default_config="local")
    assert cli_run.run_from_args(parser.parse_args(["http://g/api/v1"]), parser) == status
    out, err = capsys.readouterr()
    assert out.startswith("stopped (stop requested): 3 messages read")
    assert ("last save of the registries failed (OSError" in err) == bool(save_error)
