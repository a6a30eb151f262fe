"""ConsumerGroup over a fake librdkafka consumer: commits from the loop are
asynchronous and never block it, the revoke's last commit is synchronous, and a group
that stays unsettled while the broker answers gets a new consumer (the old one's
callbacks do nothing any more, and its close cannot hang the loop)."""

from __future__ import annotations

import json
import threading

import confluent_kafka
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from girder_upload_stream.kafka import clients
from girder_upload_stream.kafka.clients import ConsumerGroup
from girder_upload_stream.kafka.group_watch import GroupWatch
from tests.unit.fakes import Clock

TOPIC = "t"


class _Topic:
    error = None
    partitions = {0: None, 1: None}


class _Metadata:
    topics = {TOPIC: _Topic()}


class FakeConsumer:
    """librdkafka's consumer as the group uses it; callbacks are served by consume()."""

    made: list["FakeConsumer"] = []

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.commits: list[tuple[list, bool]] = []
        self.queue: list = []  # callables served by the next consume()
        self.broker_answers = True
        self.closed = False
        self.close_gate: threading.Event | None = None
        FakeConsumer.made.append(self)

    def subscribe(self, topics, on_assign, on_revoke, on_lost):
        self.on_assign, self.on_revoke, self.on_lost = on_assign, on_revoke, on_lost

    def list_topics(self, topic, timeout):
        if not self.broker_answers:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return _Metadata()

    def consume(self, num_messages, timeout):
        queue, self.queue = self.queue, []
        for call in queue:
            call()
        return []

    def assign_now(self, *partitions: int) -> None:
        self.queue.append(lambda: self.on_assign(self, [TopicPartition(TOPIC, p)
                                                        for p in partitions]))

    def stats(self, state: str, join_state: str) -> None:
        text = json.dumps({"cgrp": {"state": state, "join_state": join_state,
                                    "assignment_size": 0}})
        self.queue.append(lambda: self.settings["stats_cb"](text))

    def commit(self, offsets, asynchronous):
        self.commits.append((offsets, asynchronous))
        if asynchronous:
            self.queue.append(lambda: self.settings["on_commit"](None, offsets))
            return None
        return offsets

    def committed(self, partitions, timeout):
        return [TopicPartition(p.topic, p.partition, -1001) for p in partitions]

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        return 0, 10

    def assignment(self):
        return []

    def close(self):
        if self.close_gate is not None:
            self.close_gate.wait()
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    FakeConsumer.made = []
    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    return FakeConsumer


def _group(calls: list, clock: Clock) -> ConsumerGroup:
    group = ConsumerGroup({"group.id": "g"}, TOPIC,
                          on_revoke=lambda tps: calls.append(("revoke", tps,
                                                              group.commit({tp: (7, "")
                                                                            for tp in tps}))),
                          on_lost=lambda tps: calls.append(("lost", tps)))
    group._watch = GroupWatch(stuck_after=60, clock=clock)
    group.connect()
    return group


def test_loop_commits_are_asynchronous_and_accepted_a_round_later(fake):
    group = _group([], Clock(0.0))
    consumer = fake.made[0]
    assert "stats_cb" in consumer.settings and consumer.settings["statistics.interval.ms"]
    consumer.assign_now(0, 1)
    group.poll()
    assert group.commit({(TOPIC, 0): (5, "m")}) == {}
    (offsets, asynchronous), = consumer.commits
    assert asynchronous and [(tp.partition, tp.offset, tp.metadata) for tp in offsets] == [
        (0, 5, "m")]
    assert group.commit({(TOPIC, 0): (5, "m")}) == {}, "not answered yet: nothing sent"
    assert len(consumer.commits) == 1
    group.poll()  # serves the answer
    assert group.commit({(TOPIC, 0): (5, "m")}) == {(TOPIC, 0): (5, "m")}
    assert len(consumer.commits) == 1, "accepted: not sent again"
    assert group.commit({(TOPIC, 9): (1, "")}) == {}, "not ours: never sent"


def test_the_revoke_commits_synchronously(fake):
    calls = []
    group = _group(calls, Clock(0.0))
    consumer = fake.made[0]
    consumer.assign_now(0)
    group.poll()
    consumer.queue.append(lambda: consumer.on_revoke(consumer, [TopicPartition(TOPIC, 0)]))
    group.poll()
    (_, tps, accepted), = calls
    assert accepted == {(TOPIC, 0): (7, "")}
    assert consumer.commits[-1][1] is False and group.assignment == []


def test_a_stuck_group_gets_a_new_consumer_once_the_broker_answers(fake, caplog, timing):
    timing(stuck_check_seconds=0.0)  # ask the broker again at every poll
    clock, calls = Clock(0.0), []
    group = _group(calls, clock)
    old = fake.made[0]
    old.assign_now(0, 1)
    group.poll()
    old.stats("query-coord", "wait-unassign-call")
    group.poll()
    clock.now = 59
    group.poll()
    assert len(fake.made) == 1, "not stuck yet"
    clock.now = 61
    old.broker_answers = False
    group.poll()
    assert len(fake.made) == 1, "the broker does not answer: a new consumer would not help"
    old.broker_answers = True
    group.poll()
    assert len(fake.made) == 2 and old.closed and group.reconnects == 1
    assert calls == [("lost", [(TOPIC, 0), (TOPIC, 1)])], "nothing committed for them"
    assert group.assignment == []
    assert "a new consumer takes the place of the stuck one" in caplog.text
    assert "query-coord" in caplog.text
    # The old consumer's late callbacks do nothing; the new one's count.
    old.on_assign(old, [TopicPartition(TOPIC, 0)])
    old.settings["stats_cb"](json.dumps({"cgrp": {"state": "up", "join_state": "steady"}}))
    assert group.assignment == [] and group._watch.last is None
    new = fake.made[1]
    new.assign_now(0, 1)
    new.stats("up", "steady")
    group.poll()
    assert group.assignment == [(TOPIC, 0), (TOPIC, 1)] and group._watch.last.settled


def test_a_stuck_consumer_that_does_not_close_cannot_hang_the_loop(fake, timing):
    timing(close_stuck_seconds=0.2)
    clock = Clock(0.0)
    group = _group([], clock)
    old = fake.made[0]
    old.close_gate = threading.Event()
    old.stats("wait-coord", "init")
    group.poll()
    clock.now = 120
    group.poll()
    assert len(fake.made) == 2 and not old.closed
    old.close_gate.set()


def test_statistics_can_be_turned_off(fake):
    group = ConsumerGroup({"group.id": "g", "statistics.interval.ms": 0}, TOPIC)
    group.connect()
    assert "stats_cb" not in fake.made[0].settings
