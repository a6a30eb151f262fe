"""The checkpoint's sequence (loop/checkpoint.py), with fakes of the group, the dead
letters, the registry save and an upstream hop that write every call into one journal:
the order of the steps, what a failing step holds back, the revoke's synchronous
commit, the clamp of held messages and the upstream purge."""

from __future__ import annotations

import logging

import pytest

from girder_upload_stream.ledger.offsets import OffsetTracker
from girder_upload_stream.loop.checkpoint import Checkpoint
from girder_upload_stream.assembly.reassembly import Reassembler
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import Outcome
from girder_upload_stream.loop.runner import StreamRunner
from tests.unit.fakes import TOPIC, Clock, FakeGroup, Submitter, put_file, run_settings

P0, P1, P2 = (TOPIC, 0), (TOPIC, 1), (TOPIC, 2)


class Group:
    """A consumer group: owns ``assignment``; answers a commit with ``answers`` (None:
    accepted at once, as a synchronous commit; {}: unanswered yet) and holds back
    offsets at or past ``held`` (the decrypting reader's clamp)."""

    def __init__(self, journal: list, assignment=(P0, P1)) -> None:
        self.journal, self.assignment = journal, list(assignment)
        self.answers: list[dict | None] = []
        self.held: dict[tuple[str, int], int] = {}
        self.sent: list[tuple[dict, bool | None]] = []

    def clamp(self, plan: dict) -> dict:
        self.journal.append("clamp")
        return {tp: (min(o, self.held.get(tp, o)), m) for tp, (o, m) in plan.items()}

    def commit(self, offsets: dict, sync: bool | None = None) -> dict:
        self.journal.append("commit sync" if sync else "commit async")
        self.sent.append((dict(offsets), sync))
        answer = self.answers.pop(0) if self.answers else None
        return dict(offsets) if answer is None else answer


class Step:
    """The dead letters' settle or the recorder's try_save: True, False or raises."""

    def __init__(self, journal: list, name: str) -> None:
        self.journal, self.name, self.results = journal, name, []

    def __call__(self) -> bool:
        self.journal.append(self.name)
        result = self.results.pop(0) if self.results else True
        if isinstance(result, Exception):
            raise result
        return result


class Hop:
    """An upstream hop (the re-key hop's interface)."""

    def __init__(self, journal: list, name: str = "hop") -> None:
        self.journal, self.name = journal, name
        self.flushes: list[bool | Exception] = []
        self.purged: list[dict] = []

    def flush(self, timeout: float) -> bool:
        self.journal.append(f"{self.name} flush")
        result = self.flushes.pop(0) if self.flushes else True
        if isinstance(result, Exception):
            raise result
        return result

    def commit(self, tps=None) -> None:
        self.journal.append(f"{self.name} commit")

    def purge(self, accepted: dict) -> None:
        self.journal.append(f"{self.name} purge")
        self.purged.append(dict(accepted))


@pytest.fixture
def journal() -> list:
    return []


def tracker_read(reads: dict) -> OffsetTracker:
    """A tracker that read ``reads[tp]`` messages of each partition, all done."""
    tracker = OffsetTracker()
    for tp, n in reads.items():
        tracker.assigned(tp, None, None)
        for offset in range(n):
            tracker.read(tp, offset)
    return tracker


def make(journal, reads=None, hops=(), **group_options):
    tracker = tracker_read(reads if reads is not None else {P0: 3, P1: 2})
    group = Group(journal, **group_options)
    letters, save = Step(journal, "dead letters"), Step(journal, "save")
    checkpoint = Checkpoint(tracker, group, dead_letters=letters, save=save,
                            upstream=list(hops))
    return checkpoint, tracker, group, letters, save


def offsets(plan: dict) -> dict:
    return {tp: value[0] for tp, value in plan.items()}


def test_the_steps_run_in_their_order_and_the_answer_reaches_the_tracker(journal) -> None:
    hop = Hop(journal)
    checkpoint, tracker, group, _, _ = make(journal, hops=[hop])
    checkpoint.commit()
    assert journal == ["clamp", "dead letters", "save", "hop flush", "hop commit",
                       "commit async", "hop purge"]
    assert offsets(group.sent[0][0]) == {P0: 3, P1: 2}
    assert hop.purged == [{P0: 3, P1: 2}]
    assert tracker.commit_plan() == {}, "what the broker accepted is not planned again"
    journal.clear()
    checkpoint.commit()  # nothing new: the upstream hop is still flushed and committed
    assert journal == ["dead letters", "save", "hop flush", "hop commit"]


def test_nothing_to_commit_and_no_hop_runs_no_step(journal) -> None:
    checkpoint, _, group, _, _ = make(journal, reads={})
    checkpoint.commit()
    assert journal == [] and group.sent == []


@pytest.mark.parametrize("failing", ["dead letters", "save"])
def test_nothing_is_committed_while_the_dead_letters_or_the_save_fail(journal, failing,
                                                                       caplog) -> None:
    hop = Hop(journal)
    checkpoint, tracker, group, letters, save = make(journal, hops=[hop])
    step = letters if failing == "dead letters" else save
    step.results = [False, OSError(28, "No space left on device"),
                    OSError(28, "No space left on device")]
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream.loop.checkpoint"):
        for _ in range(3):
            checkpoint.commit()
        assert group.sent == [] and hop.purged == []
        assert not any("hop" in entry for entry in journal), "upstream hops wait too"
        if failing == "dead letters":
            assert "save" not in journal, "no registry save before the dead letters"
        checkpoint.commit()  # it works again
    assert offsets(group.sent[0][0]) == {P0: 3, P1: 2} and tracker.commit_plan() == {}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage(), "once per streak"
    assert any("commits resume" in r.getMessage() for r in caplog.records)


def test_a_hop_whose_flush_fails_skips_its_commit_only(journal, caplog) -> None:
    bad, good = Hop(journal, "bad"), Hop(journal, "good")
    bad.flushes = [False, RuntimeError("broker away"), True]
    checkpoint, _, group, _, _ = make(journal, hops=[bad, good])
    with caplog.at_level(logging.INFO, logger="girder_upload_stream.loop.checkpoint"):
        checkpoint.commit()
        assert "bad commit" not in journal and "good commit" in journal
        assert group.sent and offsets(group.sent[0][0]) == {P0: 3, P1: 2}
        assert bad.purged == good.purged == [{P0: 3, P1: 2}]
        journal.clear()
        checkpoint.commit()  # raises in flush: the same
        assert "bad flush" in journal and "bad commit" not in journal
        journal.clear()
        checkpoint.commit()
        assert journal.index("bad flush") < journal.index("bad commit")
    warned = [r for r in caplog.records if "not acknowledged" in r.getMessage()]
    assert len(warned) == 1, "once per streak"
    assert any("commits resume" in r.getMessage() for r in caplog.records)


def test_purge_only_after_an_accepted_answer_and_only_for_owned_partitions(journal) -> None:
    hop = Hop(journal)
    checkpoint, tracker, group, _, _ = make(journal, hops=[hop])
    group.answers = [{}]  # sent, not answered yet
    checkpoint.commit()
    assert hop.purged == [] and "hop purge" not in journal
    # The answer arrives, with a partition that is no longer owned (a late answer).
    plan = tracker.commit_plan(group.assignment)
    group.assignment = [P0]
    group.answers = [{**plan, P2: (9, "")}]
    checkpoint.commit()
    assert hop.purged == [{P0: 3}]


def test_the_revoke_commits_its_partitions_synchronously_without_upstream_hops(journal) -> None:
    hop = Hop(journal)
    checkpoint, _, group, _, _ = make(journal, hops=[hop])
    checkpoint.revoke([P1])
    assert group.sent == [({P1: group.sent[0][0][P1]}, True)]
    assert offsets(group.sent[0][0]) == {P1: 2}
    assert journal == ["clamp", "dead letters", "save", "commit sync", "hop purge"]
    assert hop.purged == [{P1: 2}]


def test_held_messages_clamp_the_plan_and_the_tracker_hears_the_clamped_offset(journal) -> None:
    checkpoint, tracker, group, _, _ = make(journal, reads={P0: 6})
    group.assignment = [P0]
    group.held = {P0: 3}  # offset 3 is not decrypted yet
    checkpoint.commit()
    assert offsets(group.sent[-1][0]) == {P0: 3}
    assert offsets(tracker.commit_plan()) == {P0: 6}, "still to commit past it"
    checkpoint.commit()
    assert len(group.sent) == 2 and offsets(group.sent[-1][0]) == {P0: 3}
    group.held = {}  # it decrypted (and its file is done)
    checkpoint.commit()
    assert offsets(group.sent[-1][0]) == {P0: 6} and tracker.commit_plan() == {}


def test_the_runner_commits_through_its_checkpoint(journal) -> None:
    """StreamRunner.commit (each round, and at shutdown) and on_revoke go through the
    checkpoint: asynchronous from the loop, synchronous for a revoke; the upstream hops
    given to the runner are flushed and committed in its rounds."""
    hop = Hop(journal)
    clock = Clock(now=100.0)
    processor = StreamProcessor(Reassembler(), max_unit_files=1, clock=clock)
    group = FakeGroup()
    runner = StreamRunner(run_settings(commit_interval_seconds=1000.0), processor, group,
                          Submitter(auto=Outcome.UPLOADED), clock=clock, upstream=[hop])
    put_file(group, b"a" * 4, "a.bin", [0])
    put_file(group, b"b" * 4, "b.bin", [1])
    runner.step()  # read and uploaded; no commit round yet
    assert group.commits == [] and journal == []
    runner.on_revoke([P1])
    assert group.commits == [{P1: 1}] and group.syncs == [True]
    assert journal == ["hop purge"], "a revoke does not commit the upstream hops"
    runner.commit()
    assert group.commits[-1] == {P0: 1} and group.syncs[-1] is False
    assert journal[1:] == ["hop flush", "hop commit", "hop purge"]
    assert hop.purged == [{P1: 1}, {P0: 1}]
    runner.shutdown("test")
    assert group.closed and journal[-2:] == ["hop flush", "hop commit"]
    assert len(group.commits) == 2, "nothing new to commit at shutdown"
