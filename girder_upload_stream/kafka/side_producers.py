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

from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.kafka.rdkafka_log import topic_problem, wait_for_topic, with_log

__all__ = ["HeartbeatProducer", "LogProducer", "DeadLetterProducer", "fetch_messages"]

logger = logging.getLogger(__name__)

#: How long the first send waits for the broker to say whether the topic exists.
TOPIC_CHECK_SECONDS = 5.0

#: How long the end of a run waits for side messages still queued.
CLOSE_FLUSH_SECONDS = 5.0


class _SideProducer:
    """A best-effort producer of one program's side messages (heartbeats, logs): one key,
    string values. A failure is logged here and never raised: side messages must not
    stop the consumer. Nothing fails silently either: a topic that does not exist is
    logged once, at the first send, and nothing is sent to it (librdkafka would hold
    the messages until they expire); a message the broker does not take is logged once
    per streak of failures; messages still queued at the end are counted."""

    what = "side"

    def __init__(self, settings: dict[str, Any], topic: str, key: str) -> None:
        self._settings = dict(settings)
        self.topic = topic
        self.key = key
        self._producer = None
        self._checked = False
        self._missing = False  # the broker said the topic does not exist
        self._failing = False

    def _client(self):
        from confluent_kafka import Producer
        if self._producer is None:
            self._producer = Producer(with_log(self._settings))
        return self._producer

    def _check_topic(self, producer) -> None:
        """Once: does the topic exist? A broker that does not answer now is no verdict
        (messages are then queued, best effort, as before)."""
        self._checked = True
        try:
            found = wait_for_topic(producer, self.topic, TOPIC_CHECK_SECONDS,
                                   self._settings.get("bootstrap.servers", "?"))
        except GirderUploadStreamError as exc:
            logger.debug("%s topic %s not checked: %s", self.what, self.topic, exc)
            return
        reason = topic_problem(found)
        if reason is not None:
            self._missing = True
            logger.warning("%s topic '%s' cannot be used (%s): no %s message is sent in "
                           "this run; create the topic and restart to have them", self.what,
                           self.topic, reason, self.what)

    def _produce(self, producer, value: str) -> None:
        producer.produce(self.topic, key=self.key.encode(), value=value.encode(),
                         on_delivery=self._delivered)

    def _delivered(self, err, msg) -> None:
        if err is not None and not self._failing:
            logger.warning("%s message not delivered to %s: %s (further failures are "
                           "not reported until one is delivered)", self.what, self.topic,
                           err.str())
        elif err is None and self._failing:
            logger.info("%s messages are delivered to %s again", self.what, self.topic)
        self._failing = err is not None

    def send(self, value: str) -> None:
        from confluent_kafka import KafkaException
        try:
            producer = self._client()
            if not self._checked:
                self._check_topic(producer)
            if self._missing:
                return
            self._produce(producer, value)
            producer.poll(0)
        except (KafkaException, BufferError) as exc:
            logger.warning("%s message not sent to %s: %s", self.what, self.topic, exc)

    def close(self) -> None:
        if self._producer is not None:
            left = self._producer.flush(CLOSE_FLUSH_SECONDS)
            if left:
                logger.warning("%d %s message(s) not delivered to %s before the end", left,
                               self.what, self.topic)


class HeartbeatProducer(_SideProducer):
    """Best-effort heartbeats: key ``{program_id}_heartbeat``, a JSON value with the
    counts since the previous heartbeat. OpenMSIStream ignores their delivery; here a
    failure is logged (once per streak), as for log messages."""

    what = "heartbeat"

    def __init__(self, settings: dict[str, Any], topic: str, program_id: str) -> None:
        super().__init__(settings, topic, f"{program_id}_heartbeat")


class LogProducer(_SideProducer):
    """Best-effort log messages: key ``{program_id}_log`` (see
    :mod:`girder_upload_stream.loop.log_topic`). A message the broker does not take is
    reported once per streak of failures (not once per message, so that a broker that
    is down does not fill the log with these warnings)."""

    what = "log"

    def __init__(self, settings: dict[str, Any], topic: str, program_id: str) -> None:
        super().__init__(settings, topic, f"{program_id}_log")


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
        problem = topic_problem(metadata.topics.get(self.topic))
        if problem is not None:
            raise KafkaTerminalError(
                f"cannot start: the dead-letter topic {self.topic!r} cannot be used "
                f"({problem}); create it first (girder-upload-stream never creates it)")

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
                   timeout: float) -> dict[tuple[str, int, int], tuple[Any, ...]]:
    """Read the messages at the ``wanted`` offsets again, as they are in the topic, with
    a consumer of its own that joins no group and commits nothing (the dead-letter
    topic's copies of the messages of a rejected file, whose bytes were not kept).
    Returns ``{(topic, partition, offset): (key, value, headers)}`` for those found in
    ``timeout`` seconds (offsets gone from the topic are missing)."""
    from confluent_kafka import Consumer, TopicPartition
    own = {k: v for k, v in settings.items()
           if not k.startswith(("group.", "enable.auto", "auto.", "partition.assignment"))}
    consumer = Consumer({**own, "group.id": "girder-upload-stream-dead-letter-fetch",
                         "enable.auto.commit": False, "enable.auto.offset.store": False})
    found: dict[tuple[str, int, int], tuple[bytes | None, bytes | None, Any]] = {}
    left = {tp: set(offsets) for tp, offsets in wanted.items() if offsets}
    try:
        consumer.assign([TopicPartition(t, p, min(offsets)) for (t, p), offsets in left.items()])
        deadline = time.monotonic() + timeout
        while any(left.values()) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                tp = (msg.topic(), msg.partition())
                if msg.error() is None and msg.offset() in left.get(tp, ()):
                    left[tp].discard(msg.offset())
                    found[(tp[0], tp[1], msg.offset())] = (msg.key(), msg.value(),
                                                           msg.headers())
    finally:
        consumer.close()
    return found
