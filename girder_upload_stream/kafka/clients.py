"""The consumer side of confluent-kafka: every consumer call of the project lives here
(the chunk producer is in :mod:`girder_upload_stream.kafka.chunk_producer`, the
best-effort side producers of heartbeats and log messages in
:mod:`girder_upload_stream.kafka.side_producers`).

Clients connect lazily (on first use) and librdkafka errors are turned into the
project's own exceptions, which carry topic, partition, offset and file path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from girder_upload_stream import startup
from girder_upload_stream.kafka.chunk_producer import ChunkProducer, DeliveryReport
from girder_upload_stream import timings
from girder_upload_stream.kafka.commits import CommitBook
from girder_upload_stream.kafka.errors import KafkaTerminalError, KafkaTransientError
from girder_upload_stream.kafka.gain_marks import GainMarks
from girder_upload_stream.kafka.group_offsets import GroupOffsets
from girder_upload_stream.kafka.rdkafka_log import topic_problem, wait_for_topic, with_log
from girder_upload_stream.kafka.group_watch import (STATISTICS_INTERVAL_MS, GroupState, GroupWatch,
                                                    parse_group_health)
from girder_upload_stream.kafka.side_producers import HeartbeatProducer, LogProducer
from girder_upload_stream.shared_types import PartitionInfo

if TYPE_CHECKING:
    from girder_upload_stream.settings import KafkaCryptoSettings

__all__ = [
    "KafkaTransientError",
    "KafkaTerminalError",
    "DeliveryReport",
    "ChunkProducer",
    "ConsumerGroup",
    "HeartbeatProducer",
    "LogProducer",
]

logger = logging.getLogger(__name__)

#: How long after losing partitions their old uploads may still run (and race ours).
SHARED_AFTER_REVOKE_SECONDS = 120.0

#: How long the start waits for a broker to describe the topic.
TOPIC_WAIT_SECONDS = 30.0


def _close_quietly(consumer: Any) -> None:
    try:
        consumer.close()
    except Exception as exc:  # noqa: BLE001 - a stuck consumer's close is best effort
        logger.info("closing the stuck consumer: %s", exc)


class ConsumerGroup(GroupOffsets):
    """One confluent-kafka consumer of a group, driven from a single thread.

    It is polled, committed, paused and closed by the thread that owns this object (the
    flow's loop), so rebalance callbacks run there too and never race with the offset
    bookkeeping. ``on_revoke(tps)`` is called before a partition is taken away in a
    rebalance, so the caller can commit what is safe for it while it still owns it;
    ``on_lost(tps)`` when partitions were taken away without one (the session timed
    out, or the loop did not poll for ``max.poll.interval.ms``): another member may own
    them already, so the caller must not commit for them. ``on_assign`` gets a
    :class:`PartitionInfo` per partition gained, before any of its messages. One
    consumer per process: upload concurrency comes from the upload workers, and a
    second consumer would only add a rebalance (and its re-reads) at every start.

    With ``kafkacrypto`` settings the topic is encrypted: a KafkaCrypto node is started
    with the consumer, polled messages are decrypted before they are returned, and
    commits never pass a message that is not decrypted yet (decrypting.py);
    ``recorder`` registers the messages given up.
    """

    def __init__(self, settings: dict[str, Any], topic: str, *,
                 on_revoke: Callable[[list[tuple[str, int]]], None] | None = None,
                 on_assign: Callable[[list[PartitionInfo]], None] | None = None,
                 on_lost: Callable[[list[tuple[str, int]]], None] | None = None,
                 kafkacrypto: KafkaCryptoSettings | None = None,
                 recorder: Any = None, keyed_by_file: bool = False) -> None:
        self._settings = {**settings, "enable.auto.commit": False}
        self.topic = topic
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._on_assign = on_assign
        self._consumer: Any = None
        self._owned: set[tuple[str, int]] = set()
        self._paused = False
        # One past the last offset returned per partition: the lag's fallback while
        # librdkafka's position is unknown (e.g. just after a rebalance).
        self._read_up_to: dict[tuple[str, int], int] = {}
        self._start_at: dict[tuple[str, int], int] = {}  # where fetching began
        self._trouble_at: float | None = None  # monotonic time of the last broker problem
        self._n_partitions: int | None = None
        self._revoked_at: float | None = None
        #: Where each partition's log ended when it was gained (kafka/gain_marks.py).
        self.gains = GainMarks(keyed_by_file)
        self._fatal = None
        self._kafkacrypto, self._recorder = kafkacrypto, recorder
        self._reader: Any = None  # a DecryptingReader on encrypted topics
        self._left_encrypted = 0
        self._wish_paused = False  # what the runner asked for; decryption may add a pause
        self._book = CommitBook()
        self._watch = GroupWatch()
        self._in_rebalance = False  # inside a rebalance callback: commits are synchronous
        self._generation = 0  # of the librdkafka consumer: one more after each reconnect
        self._next_stuck_check = 0.0
        self.reconnects = 0  # new consumers made because the group was stuck

    def bind(self, *, on_revoke: Callable[[list[tuple[str, int]]], None] | None = None,
             on_assign: Callable[[list[PartitionInfo]], None] | None = None,
             on_lost: Callable[[list[tuple[str, int]]], None] | None = None,
             recorder: Any = None) -> None:
        """Give a group made before its runner (and maybe joining already, see
        :meth:`connect`) the runner's callbacks. librdkafka calls them from
        :meth:`poll` only, so none was missed."""
        self._on_revoke, self._on_assign, self._on_lost = on_revoke, on_assign, on_lost
        self._recorder = recorder

    def connect(self) -> None:
        """Create the consumer and subscribe now rather than at the first poll: the
        group is joined in librdkafka's threads meanwhile (a new group's first join
        waits for the broker's ``group.initial.rebalance.delay.ms``), and the first
        poll serves the assignment. Unknown topics raise here."""
        self._connect()

    def _connect(self) -> Any:
        if self._consumer is None:
            from confluent_kafka import Consumer, KafkaException
            if self._kafkacrypto is not None and self._reader is None:
                from girder_upload_stream.kafka.crypto import start_decryption
                self._reader = start_decryption(self._kafkacrypto, self._recorder)
            try:
                consumer = Consumer(self._client_settings())
                consumer.subscribe([self.topic], on_assign=self._rebalancing(self._assigned),
                                   on_revoke=self._rebalancing(self._revoked),
                                   on_lost=self._rebalancing(self._lost))
                startup.mark("consumer subscribed")
                self._consumer = consumer
                self._check_topic(consumer)
                if self._reader is not None:
                    from girder_upload_stream.kafka.crypto import warn_missing_key_topics
                    warn_missing_key_topics(consumer, self.topic)
            except KafkaException as exc:
                raise KafkaTerminalError(f"cannot create a Kafka consumer: {exc}",
                                         topic=self.topic) from exc
        return self._consumer

    def _client_settings(self) -> dict[str, Any]:
        """The consumer's settings and our callbacks. Statistics feed the group watch
        unless the config turned them off (``statistics.interval.ms = 0``)."""
        settings = {**with_log(self._settings), "error_cb": self._mine(self._on_error),
                    "on_commit": self._mine(self._on_commit)}
        settings.setdefault("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        if int(settings["statistics.interval.ms"]):
            settings["stats_cb"] = self._mine(self._on_stats)
        return settings

    def _mine(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` for the consumer about to be made only: once :meth:`_reconnect`
        replaced it, the old one (closing in the background) may still serve its
        callbacks, and they do nothing."""
        generation = self._generation
        return lambda *args: callback(*args) if generation == self._generation else None

    def _rebalancing(self, callback: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """A rebalance callback (of this consumer only): commits made in it are
        synchronous."""
        def call(consumer, partitions) -> None:
            self._in_rebalance = True
            try:
                callback(consumer, partitions)
            finally:
                self._in_rebalance = False
        return self._mine(call)

    def _on_stats(self, stats_json: str) -> None:
        self._watch.observe(parse_group_health(stats_json))

    def _on_error(self, err) -> None:
        """librdkafka's error events (served from poll, in this thread): the broker is
        unreachable, the group coordinator is gone... librdkafka retries them and logs
        them itself; they are remembered so that such time never counts as idle."""
        self._trouble_at = time.monotonic()
        if err.fatal():
            self._fatal = err

    def quiet_seconds(self) -> float:
        """Seconds since the last sign of a broker or group problem (inf: none yet)."""
        return float("inf") if self._trouble_at is None else time.monotonic() - self._trouble_at

    @property
    def shared(self) -> bool:
        """True when another member of the group may be uploading files this process
        reads too: the group owns partitions this process does not, or partitions were
        taken from it less than :data:`SHARED_AFTER_REVOKE_SECONDS` ago."""
        if self._n_partitions is not None and len(self._owned) < self._n_partitions:
            return True
        return (self._revoked_at is not None
                and time.monotonic() - self._revoked_at < SHARED_AFTER_REVOKE_SECONDS)

    def _check_topic(self, consumer) -> None:
        try:  # in short slices: Ctrl-C works while no broker answers
            topic = wait_for_topic(consumer, self.topic, TOPIC_WAIT_SECONDS,
                                   self._settings.get("bootstrap.servers", "?"))
        except KafkaTerminalError:
            self.close()
            raise
        reason = topic_problem(topic)
        if reason is not None:
            self.close()
            raise KafkaTerminalError(f"cannot consume: {reason}", topic=self.topic)
        self._n_partitions = len(topic.partitions)

    def _assigned(self, consumer, partitions) -> None:
        self._book.new_assignment((p.topic, p.partition) for p in partitions)
        self._owned.update((p.topic, p.partition) for p in partitions)
        if self._paused and partitions:
            consumer.pause(partitions)
        if partitions:
            startup.mark("partitions assigned")
            starts = self._starts(consumer, partitions)
            for start in starts:
                begin = start.committed if start.committed is not None else start.low
                self._start_at[(start.topic, start.partition)] = begin or 0
            self.gains.gained(starts)
            if self._on_assign is not None:
                self._on_assign(starts)

    @staticmethod
    def _starts(consumer, partitions) -> list[PartitionInfo]:
        """Committed offsets (with metadata) and log start offsets of new partitions;
        unknown (None) where the broker does not answer in time."""
        from confluent_kafka import KafkaException
        try:
            committed = {(p.topic, p.partition): p
                         for p in consumer.committed(partitions, timeout=15)}
        except KafkaException as exc:
            logger.warning("could not read committed offsets at assignment: %s", exc)
            committed = {}
        starts = []
        for p in partitions:
            tp = (p.topic, p.partition)
            known = committed.get(tp)
            offset = known.offset if known is not None and known.offset >= 0 else None
            try:
                low, high = consumer.get_watermark_offsets(p, timeout=10)
            except KafkaException as exc:
                logger.warning("could not read the oldest offset of %s[%d]: %s", *tp, exc)
                low = high = None
            starts.append(PartitionInfo(p.topic, p.partition, offset,
                                         known.metadata if known is not None else None, low,
                                         high))
        return starts

    def _revoked(self, consumer, partitions) -> None:
        self._taken(partitions, self._on_revoke)

    def _lost(self, consumer, partitions) -> None:
        """librdkafka says the partitions are gone already (no revoke came first)."""
        tps = [(p.topic, p.partition) for p in partitions]
        if tps:
            logger.warning("lost %s (the consumer's session timed out, or it did not poll "
                           "in time): nothing is committed for them, their next owner "
                           "reads them again from the last commit",
                           ", ".join(f"{t}[{p}]" for t, p in tps))
        self._taken(partitions, self._on_lost)

    def _taken(self, partitions, callback) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if tps:
            self._revoked_at = time.monotonic()
            self.gains.lost(tps)
        if callback is not None and tps:
            callback(tps)
        self._book.new_assignment(tps)  # after the revoke's last commit, not before
        if self._reader is not None:
            self._reader.forget(tps)
        for tp in tps:
            self._owned.discard(tp)
            self._start_at.pop(tp, None)
            self._read_up_to.pop(tp, None)

    @property
    def assignment(self) -> list[tuple[str, int]]:
        return sorted(self._owned)

    def poll(self, max_messages: int = 500, timeout: float = 0.2) -> list[Any]:
        """Up to ``max_messages`` messages.

        Fatal errors raise :class:`KafkaTerminalError`; other broker errors are logged
        by librdkafka and retried by it, so they are skipped here.
        """
        batch = self._connect().consume(num_messages=max_messages, timeout=timeout)
        good = []
        for msg in batch:
            err = msg.error()
            if err is None:
                good.append(msg)
                self._read_up_to[(msg.topic(), msg.partition())] = msg.offset() + 1
            elif err.fatal():
                raise KafkaTerminalError(f"fatal consumer error: {err.str()}",
                                         topic=msg.topic(), partition=msg.partition())
            else:
                self._trouble_at = time.monotonic()
        if self._fatal is not None:
            raise KafkaTerminalError(f"fatal consumer error: {self._fatal.str()}",
                                     topic=self.topic)
        if self._reader is not None:
            good = self._reader.take(good)
            self._apply_pause()
        if self._watch.state is GroupState.STUCK and not good:
            self._reconnect_if_broker_answers()
        return good

    def _reconnect_if_broker_answers(self) -> None:
        """The group has not settled for a minute (:mod:`~girder_upload_stream.kafka.group_watch`):
        when the broker answers a metadata request, a new consumer takes the stuck
        one's place. While the broker is down a new consumer would not help; it is
        asked again every ``stuck_check_seconds`` (:mod:`~girder_upload_stream.timings`)."""
        from confluent_kafka import KafkaException
        now = time.monotonic()
        if now < self._next_stuck_check:
            return
        self._next_stuck_check = now + timings.current().stuck_check_seconds
        try:
            self._consumer.list_topics(self.topic, timeout=2)
        except KafkaException:
            return
        self._reconnect()

    def _reconnect(self) -> None:
        """Replace the consumer: its partitions count as lost (nothing is committed for
        them; their files are handed over), the old one closes in a thread for at most
        ``close_stuck_seconds`` (:mod:`~girder_upload_stream.timings`; closing talks to the coordinator that may be the
        stuck part), and a new one subscribes. Rejoining costs what a restart costs:
        the files in flight are read again from the last commit."""
        from confluent_kafka import TopicPartition
        logger.warning("the consumer group has not settled for %.0f s although the broker "
                       "answers (librdkafka: %s): a new consumer takes the place of the "
                       "stuck one", self._watch.unsettled_seconds,
                       self._watch.last or "no statistics")
        lost = [TopicPartition(t, p) for t, p in sorted(self._owned)]
        if lost:
            self._taken(lost, self._on_lost)
        old, self._consumer = self._consumer, None
        self._generation += 1  # the old consumer's callbacks do nothing from now on
        self._book = CommitBook()
        closer = threading.Thread(target=_close_quietly, args=(old,), daemon=True,
                                  name="gus-close-stuck-consumer")
        closer.start()
        patience = timings.current().close_stuck_seconds
        closer.join(patience)
        if closer.is_alive():
            logger.warning("the stuck consumer did not close within %.0f s; it is left to "
                           "close on its own", patience)
        self.reconnects += 1
        self._watch.restarted()
        self._connect()

    @property
    def not_decrypted(self) -> int:
        """Messages of an encrypted topic held back (not decrypted yet, uncommitted);
        after :meth:`close`, how many were left so."""
        return self._reader.held if self._reader is not None else self._left_encrypted

    def pause(self, paused: bool) -> None:
        """Stop (or restart) fetching on every assigned partition; polling continues,
        so the group membership stays alive while uploads drain. Fetching also stays
        paused while too many messages wait for their decryption key."""
        self._wish_paused = paused
        self._apply_pause()

    def _apply_pause(self) -> None:
        paused = self._wish_paused or (self._reader is not None and self._reader.backlog_full)
        if paused == self._paused:
            return
        self._paused = paused
        if self._consumer is not None:
            assigned = self._consumer.assignment()
            if assigned:
                (self._consumer.pause if paused else self._consumer.resume)(assigned)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Leave the group; the revoke callback gets a last chance to commit."""
        if self._reader is not None:  # before the revoke forgets them
            self._left_encrypted = self._reader.held
            self._reader.report_left()
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # closing is best effort at shutdown
                logger.warning("error while closing a consumer: %s", exc)
        self._consumer = None
        self._owned.clear()
        self._start_at.clear()
        self.gains.clear()
        if self._reader is not None:
            self._reader.close()  # and its KafkaCrypto node
            self._reader = None

