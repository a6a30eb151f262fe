"""The best-effort side producers: heartbeats and log messages (OpenMSIStream's
``--heartbeat_*`` and ``--log_*`` options). Their confluent-kafka calls live here, beside
:mod:`girder_upload_stream.kafka.clients`, which re-exports them.

A side message is never worth stopping the consumer for: every failure is logged and
swallowed.
"""

from __future__ import annotations

import logging
from typing import Any

from girder_upload_stream.kafka.rdkafka_log import with_log

__all__ = ["HeartbeatProducer", "LogProducer"]

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
            self._producer = Producer(with_log(self._settings))
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
