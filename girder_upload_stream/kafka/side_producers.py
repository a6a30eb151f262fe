"""The best-effort side producers: heartbeats and log messages (OpenMSIStream's
``--heartbeat_*`` and ``--log_*`` options). Their confluent-kafka calls live here, beside
:mod:`girder_upload_stream.kafka.clients`, which re-exports them.

A side message is never worth stopping the consumer for: every failure is logged and
swallowed.
"""

from __future__ import annotations

import logging
from typing import Any

from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.kafka.rdkafka_log import topic_problem, wait_for_topic, with_log

__all__ = ["HeartbeatProducer", "LogProducer"]

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
