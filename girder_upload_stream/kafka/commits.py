"""The book of offset commits: what was sent to the broker asynchronously, what it
accepted, and what is still unanswered. Pure: no confluent-kafka import, so the rules
are unit-tested without a broker.

Why asynchronous: a synchronous commit waits for the group coordinator, and while the
broker is down (or librdkafka's coordinator connection is stuck) it blocked the loop for
the whole outage and longer. A blocked loop serves no rebalance callback, so the lost
partitions were never handed back and the group could not rejoin; it wrote no progress
line, ran no idle check and no side job. With the book the loop sends a commit and
goes on; the answer is served by a later poll, and what the broker accepted reaches the
offset tracker at the next commit round. Until then the tracker's plan still holds the
same offsets, so nothing is lost, and nothing is sent twice while it waits:

1. at most one commit is unanswered at a time (unless it stayed unanswered for
   ``commit_patience_seconds`` of :mod:`~girder_upload_stream.timings`: librdkafka may have dropped it with its connection);
2. an offset the broker accepted already is not sent again;
3. an answer is only believed for partitions still owned by the assignment it was sent
   in: after a rebalance the next owner's commits win.

Commits inside a rebalance callback stay synchronous (the coordinator is driving that
rebalance, so it answers; see :meth:`ConsumerGroup.commit`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from girder_upload_stream import timings

__all__ = ["CommitBook", "CommitAnswer"]

TopicPartition = tuple[str, int]
Value = tuple[int, str]  # (offset, metadata)


@dataclass(frozen=True)
class CommitAnswer:
    """One partition of the broker's answer: its offset, and an error text or None."""

    tp: TopicPartition
    offset: int
    error: str | None = None


@dataclass
class _Sent:
    at: float
    generation: int
    values: dict[TopicPartition, Value]


class CommitBook:
    """Commits sent and not answered yet, and the offsets the broker accepted."""

    def __init__(self, patience: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if patience is None:  # the run's commit_patience_seconds
            patience = timings.current().commit_patience_seconds
        self._patience, self._clock = patience, clock
        self._unanswered: list[_Sent] = []
        self._accepted: dict[TopicPartition, Value] = {}  # the broker has these
        self._news: dict[TopicPartition, Value] = {}  # accepted, not taken by the caller yet
        self.generation = 0

    def new_assignment(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions were gained or taken: answers to earlier commits no longer count
        for them, and what the broker had for them is read again at assignment."""
        self.generation += 1
        for tp in tps:
            self._accepted.pop(tp, None)
            self._news.pop(tp, None)

    def to_send(self, values: dict[TopicPartition, Value]
                ) -> tuple[dict[TopicPartition, Value], dict[TopicPartition, Value]]:
        """``(send, accepted)``: what should go to the broker now (empty while an
        earlier commit waits for its answer, rule 1), and every acceptance not yet
        taken plus the values the broker has already (rule 2)."""
        accepted, self._news = self._news, {}
        send = {}
        for tp, value in values.items():
            if self._accepted.get(tp) == value:
                accepted[tp] = value
            else:
                send[tp] = value
        if send and self.waiting():
            return {}, accepted
        return send, accepted

    def waiting(self) -> bool:
        """True while a commit sent less than ``patience`` seconds ago is unanswered."""
        now = self._clock()
        return any(now - sent.at < self._patience for sent in self._unanswered)

    def sent(self, values: dict[TopicPartition, Value]) -> None:
        """``values`` went to the broker asynchronously."""
        if values:
            self._unanswered.append(_Sent(self._clock(), self.generation, dict(values)))

    def send_failed(self) -> None:
        """The last :meth:`sent` never left (librdkafka refused it at once)."""
        if self._unanswered:
            self._unanswered.pop()

    def accepted_now(self, values: dict[TopicPartition, Value]) -> None:
        """A synchronous commit's acceptances (inside a rebalance callback)."""
        self._accepted.update(values)
        self._news.update(values)

    def answered(self, error: str | None, answers: list[CommitAnswer],
                 owned: set[TopicPartition]) -> list[str]:
        """The broker answered the oldest unanswered commit. Returns the problems in
        it (for the caller to log); acceptances are kept for :meth:`to_send`."""
        if not self._unanswered:
            return []  # a commit made before the book knew (or after send_failed)
        sent = self._unanswered.pop(0)
        if error is not None:
            return [error]
        problems = []
        for answer in answers:
            value = sent.values.get(answer.tp)
            if answer.error is not None:
                problems.append(f"{answer.tp[0]}[{answer.tp[1]}]: {answer.error}")
            elif (value is not None and value[0] == answer.offset and answer.tp in owned
                    and sent.generation == self.generation):  # rule 3
                self._accepted[answer.tp] = value
                self._news[answer.tp] = value
        return problems
