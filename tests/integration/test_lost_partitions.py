"""Partitions lost for real (issue 12, hole 6): our runner on the real broker stops
polling for longer than ``max.poll.interval.ms``, so librdkafka leaves the group and
reports the partitions *lost* at the next poll. Meanwhile another member of the group
takes the partitions over and commits further than we had got. Nothing we do for the
lost partitions may commit over that progress: no commit is even tried for them (here
the broker would refuse one, "Unknown member"; the runner must not rely on that).

The runner is built in-process (as :func:`~girder_upload_stream.loop.wiring.build_runner`
does) so that the test decides when the loop stops polling; uploads go to the real
Girder through the upload task's own function, run synchronously.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from girder_upload_stream import timings
from girder_upload_stream.kafka.clients import ConsumerGroup
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.assembly.reassembly import Reassembler
from girder_upload_stream.loop.runner import StreamRunner
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.settings import GirderSettings, RunSettings
from girder_upload_stream.tasks.upload import upload_unit
from tests.integration.kafka_checks import committed_offsets, end_offsets
from tests.integration.local_files import write_tree
from tests.integration.programs import finish, produce_ours

pytestmark = pytest.mark.integration

#: A short session and poll interval, so that the loss takes seconds (the broker of the
#: local stack allows sessions down to 1 s).
SESSION = {"session.timeout.ms": "3000", "heartbeat.interval.ms": "500",
           "max.poll.interval.ms": "4000"}


class _Done:
    """A finished upload: the handle the runner collects."""

    def __init__(self, outcomes: list) -> None:
        self._outcomes = outcomes

    def done(self) -> bool:
        return True

    def result(self) -> list:
        return self._outcomes


def _runner(bootstrap: str, topic: str, group: str, girder: GirderSettings,
            commit_interval: float = 3600.0) -> StreamRunner:
    processor = StreamProcessor(Reassembler(), max_unit_files=64)
    holder: dict[str, StreamRunner] = {}
    consumer = ConsumerGroup(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         **SESSION}, topic,
        on_revoke=lambda tps: holder["runner"].on_revoke(tps),
        on_assign=processor.assigned, on_lost=lambda tps: holder["runner"].on_lost(tps))
    run = RunSettings(commit_interval_seconds=commit_interval, interactive=False)

    store = GirderStore(girder, topic)

    def submit(unit):
        return _Done(upload_unit.fn(unit, store))

    holder["runner"] = StreamRunner(run, processor, consumer, submit)
    return holder["runner"]


def _girder_root(stack_env, girder_client, collection: dict, topic: str
                 ) -> tuple[dict, GirderSettings]:
    """A root folder for the topic in a fresh collection, and settings uploading below it."""
    root = girder_client.createFolder(collection["_id"], topic, parentType="collection")
    return root, GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                                api_key=stack_env["GIRDER_API_KEY"], root_folder_id=root["_id"])


def _step_until(runner: StreamRunner, condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        runner.step()


def _take_over_and_commit(bootstrap: str, topic: str, group: str,
                          offsets: dict[int, int]) -> None:
    """Another member joins the group (once we were dropped), commits ``offsets`` and
    leaves."""
    other = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "enable.auto.commit": False, **SESSION})
    other.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while not other.assignment():
            assert time.monotonic() < deadline, "the other member got no partition"
            other.poll(0.2)
        other.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                     asynchronous=False)
    finally:
        other.close()


def test_lost_partitions_are_not_committed_over_the_new_owner(
        tmp_path: Path, stack_env, make_topic, make_group, kafka_admin, girder_client,
        make_collection, caplog) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group = make_topic(partitions=2), make_group()
    _, girder = _girder_root(stack_env, girder_client, make_collection(), topic)
    write_tree(tmp_path / "first", {"a.bin": b"a" * 150_000, "sub/b.bin": b"b" * 90_000})
    finish(produce_ours(tmp_path / "first", topic, bootstrap, tmp_path), "producing")
    ours = _runner(bootstrap, topic, group, girder)  # no periodic commit
    with caplog.at_level(logging.INFO, logger="girder_upload_stream"):
        _step_until(ours, lambda: ours.processor.counters.files_uploaded == 2, "2 uploads")
        plan = ours.processor.offsets.commit_plan(ours.group.assignment)
        assert {p: o for (_, p), (o, _) in plan.items()} == end_offsets(bootstrap, topic)
        assert set(committed_offsets(kafka_admin, group, topic).values()) <= {-1001}

        attempts: list[dict] = []  # every commit the runner tries from now on
        real_commit = ours.group.commit

        def spy(offsets: dict) -> dict:
            attempts.append(dict(offsets))
            return real_commit(offsets)

        ours.group.commit = spy
        time.sleep(6)  # the loop is frozen past max.poll.interval.ms: we leave the group
        write_tree(tmp_path / "second", {"c.bin": b"c" * 200_000})
        finish(produce_ours(tmp_path / "second", topic, bootstrap, tmp_path), "producing")
        theirs = end_offsets(bootstrap, topic)  # past everything we read
        _take_over_and_commit(bootstrap, topic, group, theirs)
        assert committed_offsets(kafka_admin, group, topic) == theirs

        # Back to polling: the partitions are reported lost, we rejoin and get them again
        # (the other member left), from its commit on.
        _step_until(ours, lambda: any("lost" in r.getMessage() for r in caplog.records),
                    "the partitions to be reported lost")
        assert ours.processor.offsets.pending_count() == 0
        assert attempts == []  # a revoke would have tried to commit our (older) offsets
        _step_until(ours, lambda: len(ours.group.assignment) == 2, "the partitions back")
        for _ in range(20):
            ours.step()
        summary = ours.shutdown("test")
    assert committed_offsets(kafka_admin, group, topic) == theirs
    assert summary.counters["files_uploaded"] == 2  # c.bin was past the new owner's commit
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost ")]
    assert lost and f"{topic}[0]" in lost[0] and f"{topic}[1]" in lost[0]


def test_a_stuck_group_gets_a_new_consumer_and_loses_or_doubles_nothing(
        tmp_path: Path, stack_env, make_topic, make_group, kafka_admin, girder_client,
        make_collection, caplog) -> None:
    """The group watch's remedy on the real broker: the consumer is replaced mid-run
    (its partitions count as lost, the old one closes, the new one joins), and the run
    goes on: every file lands once and the group commits to the end. The watch is told
    the group is stuck (a real stuck coordinator cannot be made on demand here)."""
    from girder_upload_stream.kafka.group_watch import GroupHealth
    from tests.integration.girder_checks import assert_exactly_once

    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group = make_topic(partitions=2), make_group()
    root, girder = _girder_root(stack_env, girder_client, make_collection(), topic)
    first = {"a.bin": b"a" * 150_000, "sub/b.bin": b"b" * 90_000}
    write_tree(tmp_path / "first", first)
    finish(produce_ours(tmp_path / "first", topic, bootstrap, tmp_path), "producing")
    ours = _runner(bootstrap, topic, group, girder, commit_interval=0.5)
    with caplog.at_level(logging.INFO, logger="girder_upload_stream"):
        _step_until(ours, lambda: ours.processor.counters.files_uploaded == 2, "2 uploads")
        # Unsettled from now on: stuck at once (the run's stuck-group limit set to 0).
        ours.group._watch.observe(GroupHealth("query-coord", "wait-join", 0))
        with timings.overridden(stuck_group_seconds=0.0):
            _step_until(ours, lambda: ours.group.reconnects == 1, "a new consumer")
        assert any("a new consumer takes the place of the stuck one" in r.getMessage()
                   and "query-coord" in r.getMessage() for r in caplog.records)
        second = {"c.bin": b"c" * 200_000}
        write_tree(tmp_path / "second", second)
        finish(produce_ours(tmp_path / "second", topic, bootstrap, tmp_path), "producing")
        _step_until(ours, lambda: ours.processor.counters.files_uploaded == 3, "3 uploads")
        _step_until(ours, lambda: ours.processor.offsets.commit_plan(ours.group.assignment)
                    == {} and len(ours.group.assignment) == 2, "commits to the end")
        summary = ours.shutdown("test")
    assert ours.group.reconnects == 1
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic)
    assert summary.counters["files_uploaded"] == 3
    assert_exactly_once(girder_client, root["_id"], {**first, **second}, topic)
