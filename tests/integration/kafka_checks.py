"""What Kafka holds: end and committed offsets, messages, raw producing."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.integration.local_files import CHUNK_SIZE
from tests.integration.programs import TIMEOUT

__all__ = ["end_offsets", "low_offsets", "committed_offsets", "drop_span_lists", "topic_messages",
           "BackgroundProducer", "produce_raw", "committed_with_metadata", "messages_at",
           "member_partitions"]


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """``{partition: high watermark}`` of ``topic``."""
    return {p: high for p, (_, high) in _watermarks(bootstrap, topic).items()}


def low_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """``{partition: low watermark}`` of ``topic`` (what retention or a purge left)."""
    return {p: low for p, (low, _) in _watermarks(bootstrap, topic).items()}


def _watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused-watermarks",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in sorted(meta.topics[topic].partitions)}
    finally:
        consumer.close()


def committed_offsets(admin, group: str, topic: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` on ``topic`` (negative: none)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {tp.partition: tp.offset for tp in result.topic_partitions if tp.topic == topic}


def member_partitions(admin, group: str) -> list[list[int]]:
    """The partitions each member of ``group`` holds now, as the broker describes the
    group (members in no particular order); [] while the group is not known."""
    from confluent_kafka import KafkaException
    try:
        described = admin.describe_consumer_groups([group])[group].result(timeout=30)
    except KafkaException:  # not there yet
        return []
    return [sorted(tp.partition for tp in m.assignment.topic_partitions)
            for m in described.members]


def drop_span_lists(admin, group: str, topic: str) -> dict[int, str]:
    """Re-commit ``group``'s offsets on ``topic`` with only the high watermark in their
    metadata (``gus1:hw=N``, as earlier builds wrote it: no offsets rule 8 span list);
    the group must have no member. Returns the metadata now committed per partition."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    current = futures[group].result(timeout=30).topic_partitions
    legacy = [TopicPartition(tp.topic, tp.partition, tp.offset,
                             metadata=(tp.metadata or "").split(";", 1)[0])
              for tp in current if tp.topic == topic and tp.offset >= 0]
    futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, legacy)])
    futures[group].result(timeout=30)
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    return {tp.partition: tp.metadata for tp in futures[group].result(timeout=30).topic_partitions
            if tp.topic == topic}


def topic_messages(bootstrap: str, topic: str, group: str, n_expected: int,
                   timeout: float = TIMEOUT) -> list:
    """Every message of ``topic`` (at least ``n_expected``), read with a plain consumer."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    messages: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < n_expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=1.0):
                assert msg.error() is None, msg.error()
                messages.append(msg)
        for msg in consumer.consume(num_messages=500, timeout=1.0):  # any extra
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) >= n_expected, (
        f"read only {len(messages)} of {n_expected} messages from {topic} in {timeout:.0f}s")
    return messages


class BackgroundProducer(threading.Thread):
    """Produces files as chunk messages from a thread, one file every ``interval``
    seconds (``encode_chunk`` of :mod:`girder_upload_stream.wire.codec`, i.e. what
    ``girder-upload-stream produce`` sends), through a plain confluent-kafka producer
    that rides out broker restarts (idempotent, long delivery timeout)."""

    def __init__(self, bootstrap: str, topic: str, files: dict[str, bytes],
                 interval: float, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(name=f"producer-{topic}", daemon=True)
        self.bootstrap, self.topic, self.files = bootstrap, topic, files
        self.interval, self.chunk_size = interval, chunk_size
        self.sent = self.acked = 0
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failures.append(f"{msg.key()!r}: {err}")
        else:
            self.acked += 1

    def run(self) -> None:
        from confluent_kafka import Producer
        from girder_upload_stream.wire.codec import chunk_file, encode_chunk
        try:
            producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 20,
                                 "enable.idempotence": True,
                                 "message.timeout.ms": 300_000, "log_level": 2,
                                 "message.max.bytes": self.chunk_size + 65_536})
            for rel, data in self.files.items():
                subdir, _, name = rel.rpartition("/")
                for chunk in chunk_file(data, subdir, self.chunk_size, filename=name):
                    key, value = encode_chunk(chunk)
                    while True:
                        try:
                            producer.produce(self.topic, value=value, key=key.encode(),
                                             on_delivery=self._delivered)
                            break
                        except BufferError:
                            producer.poll(0.5)
                    self.sent += 1
                    producer.poll(0)
                time.sleep(self.interval)
            remaining = producer.flush(240)
            if remaining:
                self.failures.append(f"{remaining} message(s) not delivered after 240 s")
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def finish(self, timeout: float = 300) -> None:
        """Wait for the thread; fail if any message was not acknowledged."""
        self.join(timeout)
        assert not self.is_alive(), f"the producer of {self.topic} is still running"
        assert self.error is None, f"the producer failed: {self.error!r}"
        assert not self.failures and self.acked == self.sent, (
            f"acknowledged {self.acked}/{self.sent}; failures: {self.failures[:10]}")


def produce_raw(bootstrap: str, topic: str,
                messages: list[tuple[bytes | str | None, bytes | None, int | None]]
                ) -> list[tuple[int, int]]:
    """Produce ``(key, value, partition)`` messages as they are (``None`` key: no key;
    ``None`` partition: the default partitioner); returns each one's (partition, offset)
    in order."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "enable.idempotence": True, "message.max.bytes": 8 << 20})
    where: list[tuple[int, int] | None] = [None] * len(messages)
    errors: list[str] = []

    def delivered(index: int):
        def callback(err, msg) -> None:
            if err is not None:
                errors.append(f"message {index}: {err}")
            else:
                where[index] = (msg.partition(), msg.offset())
        return callback

    for index, (key, value, partition) in enumerate(messages):
        kwargs: dict[str, Any] = {"value": value, "on_delivery": delivered(index)}
        if key is not None:
            kwargs["key"] = key.encode() if isinstance(key, str) else key
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, **kwargs)
        producer.poll(0)
    assert producer.flush(60) == 0, "messages still queued after 60 s"
    assert not errors and all(w is not None for w in where), errors
    return where  # type: ignore[return-value]


def committed_with_metadata(admin, group: str, topic: str) -> dict[int, tuple[int, str]]:
    """``{partition: (committed offset, commit metadata)}`` of ``group`` on ``topic``."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {tp.partition: (tp.offset, tp.metadata or "") for tp in result.topic_partitions
            if tp.topic == topic}


def messages_at(bootstrap: str, topic: str, offsets: dict[int, int],
                timeout: float = 30.0) -> dict[int, tuple[bytes | None, bytes | None]]:
    """``{partition: (key, value)}`` of the message at each given offset (for diagnoses)."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused-diagnosis",
                         "enable.auto.commit": False, "fetch.message.max.bytes": 16 << 20})
    found: dict[int, tuple[bytes | None, bytes | None]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items() if o >= 0])
        deadline = time.monotonic() + timeout
        while len(found) < sum(1 for o in offsets.values() if o >= 0) \
                and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10, timeout=1.0):
                if msg.error() is None and msg.partition() not in found \
                        and msg.offset() == offsets[msg.partition()]:
                    found[msg.partition()] = (msg.key(), msg.value())
    finally:
        consumer.close()
    return found
