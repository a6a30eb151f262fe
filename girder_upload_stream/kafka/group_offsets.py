"""The offset side of :class:`~girder_upload_stream.kafka.clients.ConsumerGroup`:
commits (asynchronous from the loop, synchronous in a rebalance callback; the book is
:mod:`girder_upload_stream.kafka.commits`), seeks, and where the consumer stands
against the end of its partitions (the lag, and whether an idle stop may happen).

A mixin over the group's state (its consumer, the partitions it owns, the book), so
that the group's module keeps its life cycle: connecting, rebalances, polling and the
replacement of a stuck consumer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from girder_upload_stream.kafka.commits import CommitAnswer, CommitBook

__all__ = ["GroupOffsets"]

logger = logging.getLogger(__name__)


class GroupOffsets:
    """Commits, seeks and positions of one consumer of a group (see the module)."""

    _consumer: Any
    _owned: set[tuple[str, int]]
    _book: CommitBook
    _in_rebalance: bool
    _reader: Any
    _read_up_to: dict[tuple[str, int], int]
    _start_at: dict[tuple[str, int], int]
    _trouble_at: float | None

    def clamp(self, offsets: dict[tuple[str, int], tuple[int, str]]
              ) -> dict[tuple[str, int], tuple[int, str]]:
        """A commit plan stopped before the messages not decrypted yet (on an encrypted
        topic; the plan as it is otherwise): see
        :meth:`~girder_upload_stream.kafka.decrypting.DecryptingReader.clamp`. Step 1 of
        :class:`~girder_upload_stream.loop.checkpoint.Checkpoint`."""
        return self._reader.clamp(offsets) if self._reader is not None else offsets

    def commit(self, offsets: dict[tuple[str, int], tuple[int, str]], sync: bool | None = None
               ) -> dict[tuple[str, int], tuple[int, str]]:
        """Commit ``{tp: (offset, metadata)}`` for the partitions owned; return what the
        broker accepted so far (:mod:`girder_upload_stream.kafka.commits` says why the
        answer may come a round later). The checkpoint
        (:class:`~girder_upload_stream.loop.checkpoint.Checkpoint`, step 5) decides what
        and when; partitions not owned (any more) are never sent.

        Asynchronous, so that a broker outage never stops the loop; synchronous with
        ``sync`` (None: inside a rebalance callback), where the revoke's last commit
        must be made before the partitions go (the coordinator that drives the
        rebalance answers it, and a session timeout ends the wait, :meth:`close`
        included)."""
        from confluent_kafka import KafkaException, TopicPartition
        owned = {tp: value for tp, value in offsets.items() if tp in self._owned}
        if self._consumer is None or not owned:
            return {}
        if sync or (sync is None and self._in_rebalance):
            return self._commit_now(owned)
        send, accepted = self._book.to_send(owned)
        if not send:
            return accepted
        self._book.sent(send)
        try:
            self._consumer.commit(offsets=[TopicPartition(t, p, o, metadata=m)
                                           for (t, p), (o, m) in send.items()],
                                  asynchronous=True)
        except KafkaException as exc:
            self._book.send_failed()
            self._trouble_at = time.monotonic()
            logger.warning("offset commit failed, will retry: %s", exc)
        return accepted

    def _commit_now(self, values: dict[tuple[str, int], tuple[int, str]]
                    ) -> dict[tuple[str, int], tuple[int, str]]:
        """A synchronous commit (inside a rebalance callback)."""
        from confluent_kafka import KafkaException, TopicPartition
        tps = [TopicPartition(t, p, o, metadata=m) for (t, p), (o, m) in values.items()]
        accepted = {}
        try:
            for tp in self._consumer.commit(offsets=tps, asynchronous=False) or tps:
                if tp.error is None:
                    accepted[(tp.topic, tp.partition)] = values[(tp.topic, tp.partition)]
        except KafkaException as exc:
            self._trouble_at = time.monotonic()
            logger.warning("offset commit before a rebalance failed: %s", exc)
        self._book.accepted_now(accepted)
        return accepted

    def _on_commit(self, err, partitions) -> None:
        """The answer to an asynchronous commit (served by a poll, or by close)."""
        answers = [CommitAnswer((tp.topic, tp.partition), tp.offset,
                                tp.error.str() if tp.error is not None else None)
                   for tp in partitions or []]
        problems = self._book.answered(err.str() if err is not None else None, answers,
                                       self._owned)
        if problems:
            self._trouble_at = time.monotonic()
            logger.warning("offset commit failed, will retry: %s", "; ".join(problems))

    def seek(self, tp: tuple[str, int], offset: int) -> bool:
        """Read ``tp`` on from ``offset`` (skipping what lies between); False if the
        partition is not ours or librdkafka refuses (it then reads on, which is safe)."""
        from confluent_kafka import KafkaException, TopicPartition
        if tp not in self._owned or self._consumer is None:
            return False
        try:
            self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.info("could not seek %s[%d] to %d, reading on: %s", *tp, offset, exc)
            return False
        return True

    def _positions(self, timeout: float | None) -> list[tuple[int, int]]:
        """``(position, end)`` of every assigned partition. The end comes from the last
        fetch's statistics (``timeout`` None: no broker round trip) or from the broker;
        the position is librdkafka's or, while that is unknown (before the first message
        after an assignment), what was read or committed."""
        return list(self._positions_by_partition(timeout).values())

    def _positions_by_partition(self, timeout: float | None) -> dict[int, tuple[int, int]]:
        """:meth:`_positions` by partition number (the group reads one topic)."""
        from confluent_kafka import TopicPartition
        consumer = self._consumer
        if consumer is None:
            return {}
        result = {}
        for tp in consumer.position(consumer.assignment()):
            key = (tp.topic, tp.partition)
            position = max(tp.offset, self._read_up_to.get(key, -1), self._start_at.get(key, -1))
            part = TopicPartition(tp.topic, tp.partition)
            high = (consumer.get_watermark_offsets(part, cached=True) if timeout is None
                    else consumer.get_watermark_offsets(part, timeout=timeout))[1]
            result[tp.partition] = (position, high)
        return result

    def lag(self) -> int | None:
        """Messages between the position and the end of every assigned partition (from
        the last fetch's statistics, no broker round trip); None while unknown."""
        from confluent_kafka import KafkaException
        try:
            known = [max(0, high - position) for position, high in self._positions(None)
                     if position >= 0 and high >= 0]
        except KafkaException:
            return None
        return sum(known) if known else None

    def partition_positions(self) -> dict[int, tuple[int, int]]:
        """``{partition: (position, high watermark)}`` of every assigned partition (-1
        where unknown), from librdkafka's cache like :meth:`lag`: no broker round trip;
        the operator's view of this member (loop/group_view.py). Raises
        ``KafkaException`` when librdkafka cannot tell."""
        return self._positions_by_partition(None)

    @property
    def group_id(self) -> str:
        """The consumer group's id, as the consumer was configured."""
        return str(getattr(self, "_settings", {}).get("group.id", ""))

    def caught_up(self, timeout: float = 5.0) -> bool:
        """True if the broker answers and every assigned partition has been read to its
        end: what an idle stop needs (a broker that is down is not "no new message")."""
        from confluent_kafka import KafkaException
        if not self._owned or (self._reader is not None and self._reader.waiting):
            return False  # messages waiting for their decryption key are not idleness
        try:
            return all(high <= position for position, high in self._positions(timeout))
        except KafkaException as exc:
            self._trouble_at = time.monotonic()
            logger.info("not idle: the broker does not answer (%s)", exc)
            return False
