"""Every confluent-kafka call of the re-key hop (``--rekey_by_file``) but its consumer
(a :class:`~girder_upload_stream.kafka.clients.ConsumerGroup`): the internal topic's
creation, the producer that re-produces chunks to it, and the purge of its records.

The internal topic ``<topic>--<group>--by-file`` is made by the first consumer that
needs it, like Kafka Streams' repartition topics: the source topic's partition count
and replication factor, ``max.message.bytes`` of the source plus room for the origin
headers, ``cleanup.policy=delete`` and a retention (``retention.ms`` in the config
file's ``[rekey_by_file]`` section, 7 days by default). Records are also deleted below
what the second hop committed (:func:`purge_records`, ``delete_records``), so the topic
holds little more than the files in flight.

All calls are made from the run's loop thread; the producer's delivery reports are
served by its :meth:`RekeyProducer.poll` and :meth:`RekeyProducer.flush` there too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from girder_upload_stream import timings
from girder_upload_stream.kafka.errors import KafkaTerminalError
from girder_upload_stream.kafka.rdkafka_log import with_log

__all__ = ["RekeyProducer", "ensure_internal_topic", "purge_records", "unprocessed_messages",
           "HEADER_ROOM", "DEFAULT_RETENTION_MS", "QUEUE_KBYTES"]

logger = logging.getLogger(__name__)

#: Bytes added to the source's ``max.message.bytes`` for the origin headers (the source
#: topic's name, partition, offset and the original key).
HEADER_ROOM = 64 << 10
#: The internal topic's retention when the config file sets none: 7 days.
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
#: The producer's local queue (KiB): a full queue stops the hop's polling for a round.
QUEUE_KBYTES = 32 << 10
#: How often the metadata is asked again while a topic just created does not show.
VISIBLE_POLL_SECONDS = 0.2
#: The broker's default ``max.message.bytes`` (when the source's cannot be read).
BROKER_DEFAULT_MAX_BYTES = 1048588


def _admin(settings: dict[str, Any]) -> Any:
    from confluent_kafka.admin import AdminClient
    return AdminClient(with_log(settings))


def _source_shape(admin: Any, source: str, timeout: float) -> tuple[int, int, int]:
    """``(partitions, replication factor, max.message.bytes)`` of the source topic."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource, ResourceType
    try:
        found = admin.list_topics(source, timeout=timeout).topics.get(source)
    except KafkaException as exc:
        raise KafkaTerminalError(f"cannot describe the topic to re-key: {exc}",
                                 topic=source) from None
    if found is None or found.error is not None or not found.partitions:
        raise KafkaTerminalError("cannot re-key by file: the topic does not exist",
                                 topic=source)
    replicas = max(len(p.replicas) for p in found.partitions.values()) or 1
    max_bytes = BROKER_DEFAULT_MAX_BYTES
    try:
        resource = ConfigResource(ResourceType.TOPIC, source)
        configs = admin.describe_configs([resource])[resource].result(timeout)
        entry = configs.get("max.message.bytes")
        if entry is not None and entry.value:
            max_bytes = int(entry.value)
    except Exception as exc:  # noqa: BLE001 - the broker's default is the usual value
        logger.info("could not read max.message.bytes of %s (%s): assuming %d", source,
                    exc, max_bytes)
    return len(found.partitions), replicas, max_bytes


def ensure_internal_topic(settings: dict[str, Any], source: str, internal: str,
                          retention_ms: int, timeout: float = 30.0) -> tuple[int, int]:
    """Create ``internal`` when missing, shaped after ``source``; return its partition
    count and its ``max.message.bytes``. An internal topic made before is used as it
    is (a warning when its partition count differs from the source's)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic
    admin = _admin(settings)
    partitions, replicas, max_bytes = _source_shape(admin, source, timeout)
    wanted = max_bytes + HEADER_ROOM
    topic = NewTopic(internal, num_partitions=partitions, replication_factor=replicas,
                     config={"cleanup.policy": "delete", "retention.ms": str(retention_ms),
                             "max.message.bytes": str(wanted)})
    try:
        admin.create_topics([topic], operation_timeout=timeout)[internal].result(timeout)
        logger.info("created the internal topic %s (%d partitions, replication factor %d, "
                    "retention %d ms)", internal, partitions, replicas, retention_ms)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise KafkaTerminalError(f"cannot create the internal topic {internal}: {exc}",
                                     topic=source) from None
    count = _visible_partitions(admin, internal, timeout)
    if count == 0:
        raise KafkaTerminalError(
            f"the internal topic {internal} shows no partitions after "
            f"{timings.current().rekey_topic_visible_seconds:g} s", topic=source)
    if count != partitions:
        logger.warning("the internal topic %s has %d partitions, the source %d: files are "
                       "spread over its %d", internal, count, partitions, count)
    return count, wanted


def _visible_partitions(admin: Any, internal: str, timeout: float,
                        clock: Callable[[], float] = time.monotonic,
                        pause: Callable[[float], Any] = time.sleep) -> int:
    """The partition count of ``internal`` as the metadata shows it. A topic just
    created may not show yet (the controller's metadata reaches the broker asked a
    moment later): it is asked again every :data:`VISIBLE_POLL_SECONDS` for up to
    ``rekey_topic_visible_seconds`` (timings.py); 0 if it never shows."""
    deadline = clock() + timings.current().rekey_topic_visible_seconds
    while True:
        have = admin.list_topics(internal, timeout=timeout).topics.get(internal)
        ready = have is not None and bool(have.partitions)
        if ready or clock() >= deadline:
            return len(have.partitions) if ready else 0
        pause(min(VISIBLE_POLL_SECONDS, max(0.0, deadline - clock())))


def unprocessed_messages(settings: dict[str, Any], source: str, internal: str, group: str,
                         timeout: float = 10.0) -> int:
    """How many messages of the internal topic ``internal`` its second hop's ``group``
    has not committed past (0 when there is no such topic: one metadata request for it,
    after the one for ``source``). A run
    without ``--rekey_by_file`` reads the source from the first hop's commits, so these
    chunks would never be read: the caller refuses to start. No broker answering is the
    consumer group's usual one line (the same wait, the same words, the ``source``)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from girder_upload_stream.kafka.clients import TOPIC_WAIT_SECONDS
    from girder_upload_stream.kafka.rdkafka_log import topic_problem, wait_for_topic
    servers = settings.get("bootstrap.servers", "?")
    try:
        # A consumer, not an admin client: the settings are the consumer's (an admin
        # client would warn about each consumer-only property).
        consumer = Consumer(with_log({**settings, "group.id": group,
                                      "enable.auto.commit": False}))
        try:
            wait_for_topic(consumer, source, TOPIC_WAIT_SECONDS, servers)
            found = wait_for_topic(consumer, internal, TOPIC_WAIT_SECONDS, servers)
            if topic_problem(found) is not None or not found.partitions:
                return 0
            tps = [TopicPartition(internal, p) for p in sorted(found.partitions)]
            left = 0
            for tp in consumer.committed(tps, timeout=timeout):
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
                left += max(0, high - max(tp.offset, low))
            return left
        finally:
            consumer.close()
    except KafkaException as exc:
        raise KafkaTerminalError(f"cannot read the re-keyed topic's offsets: {exc}",
                                 topic=internal) from None


class RekeyProducer:
    """The first hop's producer to the internal topic: explicit partitions, origin
    headers, idempotent (no duplicates from its own retries, order kept per
    partition), a bounded local queue (:meth:`send` raises ``BufferError`` when full:
    the hop stops polling for the round)."""

    def __init__(self, settings: dict[str, Any], topic: str, max_bytes: int) -> None:
        from confluent_kafka import Producer
        self.topic = topic
        own = {"linger.ms": "5", "queue.buffering.max.kbytes": str(QUEUE_KBYTES),
               **settings, "enable.idempotence": True, "allow.auto.create.topics": False,
               "message.max.bytes": str(max_bytes)}
        self._producer = Producer(with_log(own))

    def send(self, key: bytes | None, value: bytes | None, partition: int,
             headers: list[tuple[str, bytes]],
             on_delivered: Callable[[str | None], None]) -> None:
        """Queue one message; ``on_delivered(error_or_None)`` is called from
        :meth:`poll` or :meth:`flush`. Raises ``BufferError`` when the queue is full."""
        def delivered(err, _msg) -> None:
            on_delivered(None if err is None else err.str())
        self._producer.produce(self.topic, key=key, value=value, partition=partition,
                               headers=headers, on_delivery=delivered)

    def poll(self) -> None:
        """Serve the delivery reports that arrived (never waits)."""
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every answer; messages still without one."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> int:
        return self._producer.flush(timeout)


class Purger:
    """``delete_records`` on the internal topic, without waiting for the answer (it is
    logged when it comes, from the admin client's thread)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._admin_client: Any = None
        self.deleted_below: dict[tuple[str, int], int] = {}  # what the broker confirmed
        self._futures: list[Any] = []

    def purge(self, floors: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import TopicPartition
        if not floors:
            return
        if self._admin_client is None:
            self._admin_client = _admin(self._settings)
        wanted = [TopicPartition(t, p, o) for (t, p), o in floors.items()]
        try:
            futures = self._admin_client.delete_records(wanted)
        except Exception as exc:  # noqa: BLE001 - purging is best effort
            logger.warning("could not delete the internal topic's records: %s", exc)
            return
        for tp, future in futures.items():
            future.add_done_callback(lambda f, tp=tp: self._answered(tp, f))
        self._futures = [*[f for f in self._futures if not f.done()], *futures.values()]

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the purges sent (at shutdown, before the admin
        client goes with the process)."""
        import concurrent.futures
        if self._futures:
            concurrent.futures.wait(self._futures, timeout)

    def _answered(self, tp: Any, future: Any) -> None:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the next purge tries again
            logger.info("deleting records of %s[%d] failed: %s", tp.topic, tp.partition, exc)
            return
        self.deleted_below[(tp.topic, tp.partition)] = getattr(result, "low_watermark", tp.offset)


def purge_records(settings: dict[str, Any]) -> Purger:
    """The purge of the internal topic (a :class:`Purger` on its own admin client)."""
    return Purger(settings)
