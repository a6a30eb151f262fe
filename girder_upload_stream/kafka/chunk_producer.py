"""The producer of chunk messages (our own producer and the benchmarks' feeds): every
message acknowledged or reported, never dropped silently."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from girder_upload_stream.kafka.errors import KafkaTerminalError
from girder_upload_stream.kafka.rdkafka_log import (SLICE_SECONDS, topic_problem, wait_for_topic,
                                                  with_log)

__all__ = ["DeliveryReport", "ChunkProducer", "QUIET_FLUSH_SECONDS"]

logger = logging.getLogger(__name__)

#: After this long waiting for acknowledgements, the wait is said (once).
QUIET_FLUSH_SECONDS = 5.0


@dataclass
class DeliveryReport:
    """What the broker acknowledged after a flush."""

    sent: int = 0
    acked: int = 0
    acked_bytes: int = 0
    failures: list[str] = field(default_factory=list)


class ChunkProducer:
    """Produces chunk messages to one topic and counts broker acknowledgements.

    ``send`` never drops a message silently: when librdkafka's local queue is full it
    serves delivery callbacks until there is room, and every delivery error is kept
    in the report so the caller can exit non-zero. ``encrypt(topic, key, value)``
    (a KafkaCrypto node's) encrypts each message before it is queued.
    """

    def __init__(self, settings: dict[str, Any], topic: str,
                 on_delivered: Callable[[int], None] | None = None,
                 encrypt: Callable[[str, bytes, bytes], tuple[bytes, bytes]] | None = None
                 ) -> None:
        self._settings = dict(settings)
        self.topic = topic
        self._encrypt = encrypt
        self._producer = None
        self._on_delivered = on_delivered
        self._lock = threading.Lock()
        self.report = DeliveryReport()

    def _client(self):
        if self._producer is None:
            from confluent_kafka import KafkaException, Producer
            try:
                self._producer = Producer(with_log(self._settings))
            except KafkaException as exc:
                raise KafkaTerminalError(f"cannot create a Kafka producer: {exc}",
                                         topic=self.topic) from exc
        return self._producer

    def _delivered(self, err, msg) -> None:
        with self._lock:
            if err is not None:
                key = msg.key().decode("utf-8", "replace") if msg.key() else "?"
                self.report.failures.append(f"{key}: {err.str()}")
                return
            self.report.acked += 1
            self.report.acked_bytes += len(msg.value() or b"")
        if self._on_delivered is not None:
            self._on_delivered(len(msg.value() or b""))

    def send(self, key: str, value: bytes, *, rel_path: str | None = None) -> None:
        """Queue one message; block (serving callbacks) while the local queue is full."""
        producer = self._client()
        key_bytes = key.encode("utf-8")
        if self._encrypt is not None:
            key_bytes, value = self._encrypt(self.topic, key_bytes, value)
        while True:
            try:
                producer.produce(self.topic, value=value, key=key_bytes,
                                 on_delivery=self._delivered)
                break
            except BufferError:
                producer.poll(0.5)
            except Exception as exc:  # KafkaException, or a TypeError/ValueError on bad input
                raise KafkaTerminalError(f"cannot produce: {exc}", topic=self.topic,
                                         rel_path=rel_path) from exc
        self.report.sent += 1
        producer.poll(0)

    def check_topic(self, seconds: float = 30.0) -> None:
        """Fail fast, with one line, when no broker answers within ``seconds`` or the
        topic does not exist (the broker would hold every message until it times out);
        Ctrl-C ends the wait."""
        topic = wait_for_topic(self._client(), self.topic, seconds,
                               self._settings.get("bootstrap.servers", "?"))
        reason = topic_problem(topic)
        if reason is not None:
            raise KafkaTerminalError(f"cannot produce: {reason} (create the topic first, "
                                     "e.g. with docs/examples/create_topic.py)",
                                     topic=self.topic)

    def flush(self, timeout: float = 120.0) -> DeliveryReport:
        """Wait for every queued message to be acknowledged or to fail (in short
        slices, so that Ctrl-C ends the wait)."""
        if self._producer is not None:
            started = time.monotonic()
            remaining, told = self._producer.flush(0), False
            while remaining and time.monotonic() - started < timeout:
                remaining = self._producer.flush(SLICE_SECONDS)
                if remaining and not told and time.monotonic() - started > QUIET_FLUSH_SECONDS:
                    told = True  # librdkafka's own lines are at DEBUG: say why it waits
                    logger.warning("waiting for the broker to acknowledge %d message(s), "
                                   "for %.0f s at most (Ctrl-C stops)", remaining, timeout)
            if remaining:
                self.report.failures.append(
                    f"{remaining} message(s) still queued after {timeout:.0f}s")
        return self.report
