"""The side producers: heartbeats and log messages (OpenMSIStream's ``--heartbeat_*``
and ``--log_*`` options), and the dead-letter topic's. Their confluent-kafka calls live
here, beside :mod:`girder_upload_stream.kafka.clients`, which re-exports them.

A heartbeat or log message is never worth stopping the consumer for: every failure is
logged and swallowed. A dead letter is: the source offset waits for its acknowledgement
(:class:`DeadLetterProducer`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["HeartbeatProducer", "LogProducer", "DeadLetterProducer", "fetch_messages"]

logger = logging.getLogger(__name__)


class _SideProducer:
    """A best-effort producer of one program's side messages (heartbeats, logs): one key,
    string values. A failure is logged here and never raised: side messages must not
    stop the consumer."""

    what = "side"

    def __init__(self, settings: dict[str, Any], topic: str, key: str) -> None:
        self._settings = dict(settings)
        self.topic = topic
        self.key = key
        self._producer = None

    def _client(self):
        from confluent_kafka import Producer
        if self._producer is None:
            self._producer = Producer(self._settings)
        return self._producer

    def _produce(self, producer, value: str) -> None:
        producer.produce(self.topic, key=self.key.encode(), value=value.encode())

    def send(self, value: str) -> None:
        from confluent_kafka import KafkaException
        try:
            producer = self._client()
            self._produce(producer, value)
            producer.poll(0)
        except (KafkaException, BufferError) as exc:
            logger.warning("%s message not sent to %s: %s", self.what, self.topic, exc)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)


class HeartbeatProducer(_SideProducer):
    """Best-effort heartbeats: key ``{program_id}_heartbeat``, a JSON value with the
    counts since the previous heartbeat; no delivery callbacks, as in OpenMSIStream."""

    what = "heartbeat"

    def __init__(self, settings: dict[str, Any], topic: str, program_id: str) -> None:
        super().__init__(settings, topic, f"{program_id}_heartbeat")


class LogProducer(_SideProducer):
    """Best-effort log messages: key ``{program_id}_log`` (see
    :mod:`girder_upload_stream.loop.log_topic`). Unlike heartbeats, a message the broker
    does not take is reported, once per streak of failures (not once per message, so
    that a broker that is down does not fill the log with these warnings)."""

    what = "log"

    def __init__(self, settings: dict[str, Any], topic: str, program_id: str) -> None:
        super().__init__(settings, topic, f"{program_id}_log")
        self._failing = False

    def _produce(self, producer, value: str) -> None:
        producer.produce(self.topic, key=self.key.encode(), value=value.encode(),
                         on_delivery=self._delivered)

    def _delivered(self, err, msg) -> None:
        if err is not None and not self._failing:
            logger.warning("log message not delivered to %s: %s (further failures are "
                           "not reported until one is delivered)", self.topic, err.str())
        elif err is None and self._failing:
            logger.info("log messages are delivered to %s again", self.topic)
        self._failing = err is not None


class DeadLetterProducer:
    """The dead-letter topic's producer: rejected messages, unchanged, with headers.

    Unlike the side producers it is not best effort: :meth:`settle` says whether every
    message handed to :meth:`send` was acknowledged by the broker, and the runner commits
    no source offset until it was (loop/dead_letter.py). Topics are never created by it
    (``allow.auto.create.topics`` off): :meth:`check` stops the start when the topic is
    missing, rather than let a typo create a new one."""

    def __init__(self, settings: dict[str, Any], topic: str) -> None:
        from confluent_kafka import Producer
        self.topic = topic
        self._producer = Producer({**settings, "allow.auto.create.topics": False,
                                   "enable.idempotence": True})

    def check(self, timeout: float) -> None:
        """Raise :class:`KafkaTerminalError` unless the topic exists (and the broker can
        be reached within ``timeout`` seconds)."""
        from confluent_kafka import KafkaException
        from girder_upload_stream.kafka.errors import KafkaTerminalError
        try:
            metadata = self._producer.list_topics(self.topic, timeout=timeout)
        except KafkaException as exc:
            raise KafkaTerminalError(f"cannot start: the dead-letter topic {self.topic!r} "
                                     f"cannot be looked up: {exc}") from None
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            raise KafkaTerminalError(
                f"cannot start: the dead-letter topic {self.topic!r} does not exist "
                f"({found.error.str() if found is not None and found.error else 'unknown topic'}); "
                f"create it first (girder-upload-stream never creates it)")

    def send(self, token: int, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]], on_delivered) -> None:
        """Queue one message; ``on_delivered(token, error_or_None)`` is called from
        :meth:`flush`. A full local queue is drained first (never raises BufferError)."""
        def delivered(err, _msg) -> None:
            on_delivered(token, None if err is None else err.str())
        while True:
            try:
                self._producer.produce(self.topic, key=key, value=value, headers=headers,
                                       on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.1)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the broker's answers; the number of
        messages still without one."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._producer.flush(timeout)


def fetch_messages(settings: dict[str, Any], wanted: dict[tuple[str, int], set[int]],
                   timeout: float) -> dict[tuple[str, int, int], tuple[bytes | None,
                                                                     bytes | None]]:
    """Read the messages at the ``wanted`` offsets again, as they are in the topic, with
    a consumer of its own that joins no group and commits nothing (the dead-letter
    topic's copies of the messages of a rejected file, whose bytes were not kept).
    Returns ``{(topic, partition, offset): (key, value)}`` for those found in
    ``timeout`` seconds (offsets gone from the topic are missing)."""
    from confluent_kafka import Consumer, TopicPartition
    own = {k: v for k, v in settings.items()
           if not k.startswith(("group.", "enable.auto", "auto.", "partition.assignment"))}
    consumer = Consumer({**own, "group.id": "girder-upload-stream-dead-letter-fetch",
                         "enable.auto.commit": False, "enable.auto.offset.store": False})
    found: dict[tuple[str, int, int], tuple[bytes | None, bytes | None]] = {}
    left = {tp: set(offsets) for tp, offsets in wanted.items() if offsets}
    try:
        consumer.assign([TopicPartition(t, p, min(offsets)) for (t, p), offsets in left.items()])
        deadline = time.monotonic() + timeout
        while any(left.values()) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                tp = (msg.topic(), msg.partition())
                if msg.error() is None and msg.offset() in left.get(tp, ()):
                    left[tp].discard(msg.offset())
                    found[(tp[0], tp[1], msg.offset())] = (msg.key(), msg.value())
    finally:
        consumer.close()
    return found
