"""Is librdkafka's consumer group stuck? Pure: librdkafka's statistics (its JSON text)
and a clock go in, a verdict comes out.

A consumer whose group never settles again after a broker restart reads nothing for
ever while looking alive: the loop polls, the broker answers metadata, yet the group
stays without its coordinator or in the middle of a join. librdkafka reports its group
state in the statistics it emits every ``statistics.interval.ms``; the watch follows
that state through three named states:

- ``SETTLED``: the group is ``up`` and its join state ``steady`` (with or without
  partitions: a member of a group with more members than partitions is settled too);
- ``UNSETTLED``: anything else, since a known time (a rebalance, an outage);
- ``STUCK``: unsettled for ``stuck_group_seconds`` (:mod:`~girder_upload_stream.timings`,
  60 s) or more. The consumer group then
  makes a new consumer (:meth:`ConsumerGroup.poll`); :meth:`GroupWatch.restarted` begins
  the count again, so a broker that stays down is not a reason to churn consumers faster
  than once per interval.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from girder_upload_stream import timings

__all__ = ["STATISTICS_INTERVAL_MS", "GroupHealth", "GroupState",
           "GroupWatch", "parse_group_health"]

#: librdkafka's statistics interval the consumer asks for unless its config sets one.
STATISTICS_INTERVAL_MS = 5000


class GroupState(enum.Enum):
    SETTLED = "settled"
    UNSETTLED = "unsettled"
    STUCK = "stuck"


@dataclass(frozen=True)
class GroupHealth:
    """librdkafka's view of the group: ``state`` (``up``, ``query-coord``...),
    ``join_state`` (``steady``, ``wait-join``...) and the partitions assigned."""

    state: str
    join_state: str
    assigned: int

    @property
    def settled(self) -> bool:
        return self.state == "up" and self.join_state == "steady"

    def __str__(self) -> str:
        return f"state {self.state}, join state {self.join_state}, {self.assigned} assigned"


def parse_group_health(stats_json: str) -> GroupHealth | None:
    """The group part of librdkafka's statistics; None when absent or unreadable (a
    consumer without a group, or a future format)."""
    try:
        cgrp = json.loads(stats_json).get("cgrp")
        if not isinstance(cgrp, dict):
            return None
        return GroupHealth(str(cgrp["state"]), str(cgrp["join_state"]),
                           int(cgrp.get("assignment_size", 0)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class GroupWatch:
    """Follows the group's health from one statistics report to the next."""

    def __init__(self, stuck_after: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # None: the run's ``stuck_group_seconds`` (girder_upload_stream.timings), read
        # at each look so that a test's override takes effect on a running group.
        self._stuck_after_given, self._clock = stuck_after, clock
        self._unsettled_since: float | None = None
        self.last: GroupHealth | None = None

    def _stuck_after(self) -> float:
        given = self._stuck_after_given
        return timings.current().stuck_group_seconds if given is None else given

    def observe(self, health: GroupHealth | None) -> None:
        """Take one report (None: nothing known, the state stays as it was)."""
        if health is None:
            return
        self.last = health
        if health.settled:
            self._unsettled_since = None
        elif self._unsettled_since is None:
            self._unsettled_since = self._clock()

    @property
    def unsettled_seconds(self) -> float:
        """How long the group has been unsettled (0 when settled)."""
        since = self._unsettled_since
        return 0.0 if since is None else self._clock() - since

    @property
    def state(self) -> GroupState:
        if self._unsettled_since is None:
            return GroupState.SETTLED
        if self.unsettled_seconds >= self._stuck_after():
            return GroupState.STUCK
        return GroupState.UNSETTLED

    def restarted(self) -> None:
        """A new consumer was made: unsettled from now on, until its group settles."""
        self._unsettled_since = self._clock()
        self.last = None
