"""The consumer group watch (kafka/group_watch.py): librdkafka's statistics in, the
states SETTLED, UNSETTLED and STUCK out."""

from __future__ import annotations

import json

from girder_upload_stream.kafka.group_watch import (GroupHealth, GroupState, GroupWatch,
                                                    parse_group_health)
from tests.unit.fakes import Clock


def stats(state: str, join_state: str, assigned: int = 4) -> str:
    return json.dumps({"name": "rdkafka#consumer-1", "type": "consumer", "brokers": {},
                       "cgrp": {"state": state, "stateage": 1234, "join_state": join_state,
                                "rebalance_age": 1, "rebalance_cnt": 2,
                                "assignment_size": assigned}})


def test_statistics_are_read():
    assert parse_group_health(stats("up", "steady", 3)) == GroupHealth("up", "steady", 3)
    assert parse_group_health(json.dumps({"type": "consumer"})) is None
    assert parse_group_health("not json") is None
    assert parse_group_health(json.dumps({"cgrp": {"state": "up"}})) is None
    assert parse_group_health("[]") is None


def test_the_watch_walks_settled_unsettled_stuck_and_back():
    clock = Clock(0.0)
    watch = GroupWatch(stuck_after=60, clock=clock)
    assert watch.state is GroupState.SETTLED
    watch.observe(parse_group_health(stats("up", "steady")))
    assert watch.state is GroupState.SETTLED
    clock.now = 10
    watch.observe(parse_group_health(stats("query-coord", "wait-unassign-call")))
    assert watch.state is GroupState.UNSETTLED
    clock.now = 40
    watch.observe(parse_group_health(stats("up", "wait-join", 0)))
    assert watch.state is GroupState.UNSETTLED and watch.unsettled_seconds == 30
    clock.now = 70
    assert watch.state is GroupState.STUCK, "unsettled since 10 s, in any unsettled state"
    watch.observe(parse_group_health(stats("up", "steady")))
    assert watch.state is GroupState.SETTLED and watch.unsettled_seconds == 0


def test_a_settled_member_without_partitions_is_not_stuck():
    clock = Clock(0.0)
    watch = GroupWatch(stuck_after=60, clock=clock)
    watch.observe(parse_group_health(stats("up", "steady", 0)))
    clock.now = 1000
    assert watch.state is GroupState.SETTLED


def test_no_statistics_change_nothing():
    clock = Clock(0.0)
    watch = GroupWatch(stuck_after=60, clock=clock)
    watch.observe(parse_group_health(stats("wait-coord", "init")))
    clock.now = 59
    watch.observe(None)
    clock.now = 61
    assert watch.state is GroupState.STUCK


def test_a_new_consumer_counts_as_unsettled_until_its_group_settles():
    clock = Clock(0.0)
    watch = GroupWatch(stuck_after=60, clock=clock)
    watch.observe(parse_group_health(stats("query-coord", "init")))
    clock.now = 61
    assert watch.state is GroupState.STUCK
    watch.restarted()
    assert watch.state is GroupState.UNSETTLED and watch.last is None
    clock.now = 121
    assert watch.state is GroupState.STUCK, "a new consumer that never settles either"
    watch.observe(parse_group_health(stats("up", "steady")))
    assert watch.state is GroupState.SETTLED
    assert str(GroupHealth("up", "steady", 2)) == "state up, join state steady, 2 assigned"
