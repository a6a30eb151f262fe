"""The local stack is real: a Kafka broker with consumer groups and committed offsets,
and a Girder server that stores, describes and returns files."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

pytestmark = pytest.mark.integration

N_MESSAGES = 400


def _consumer(bootstrap: str, group: str):
    from confluent_kafka import Consumer
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })


def _poll_n(consumer, n: int, timeout: float = 60.0) -> list:
    """Poll until ``n`` messages arrived (failing on errors or on timeout)."""
    import time
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=min(100, n - len(got)), timeout=1.0):
            assert msg.error() is None, msg.error()
            got.append(msg)
    assert len(got) == n, f"only {len(got)} of {n} messages within {timeout}s"
    return got


def test_kafka_consumer_group_resumes_from_committed_offsets(kafka_bootstrap, make_topic, make_group):
    from confluent_kafka import Producer, TopicPartition

    topic = make_topic(partitions=4)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(N_MESSAGES):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    assert producer.flush(30) == 0

    group = make_group()
    first = _consumer(kafka_bootstrap, group)
    first.subscribe([topic])
    part_one = _poll_n(first, N_MESSAGES // 2)
    # Commit exactly what was processed: next offset to read, per partition.
    last: dict[int, int] = {}
    for msg in part_one:
        last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())
    first.commit(offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()],
                 asynchronous=False)
    first.close()

    second = _consumer(kafka_bootstrap, group)
    second.subscribe([topic])
    part_two = _poll_n(second, N_MESSAGES - len(part_one))
    second.close()

    seen_one = {m.value() for m in part_one}
    seen_two = {m.value() for m in part_two}
    assert len({m.partition() for m in part_one + part_two}) == 4
    assert not seen_one & seen_two, "a committed message was delivered again"
    assert seen_one | seen_two == {f"v{i}".encode() for i in range(N_MESSAGES)}


def test_kafka_does_not_auto_create_topics(kafka_bootstrap, kafka_admin, make_group):
    from confluent_kafka import Consumer
    missing = f"never-created-{make_group()}"
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": make_group(),
                         "allow.auto.create.topics": True})
    try:
        consumer.list_topics(topic=missing, timeout=10)
    finally:
        consumer.close()
    assert missing not in kafka_admin.list_topics(timeout=10).topics


def test_girder_folder_chain_upload_metadata_and_download(girder_client, make_collection, tmp_path):
    collection = make_collection()
    parent, parent_type = collection, "collection"
    for name in ("level1", "level2", "level3"):
        parent = girder_client.createFolder(parent["_id"], name, parentType=parent_type)
        parent_type = "folder"

    payload = os.urandom(3 * 1024 * 1024 + 17)
    sha256 = hashlib.sha256(payload).hexdigest()
    uploaded = girder_client.uploadStreamToFolder(
        parent["_id"], io.BytesIO(payload), "data.bin", len(payload))
    item_id = uploaded["itemId"]
    meta = {"KafkaTopic": "topic", "checksum": {"sha256": sha256}}
    girder_client.addMetadataToItem(item_id, meta)

    item = girder_client.getItem(item_id)
    assert item["meta"] == meta
    assert [i["_id"] for i in girder_client.listItem(parent["_id"], name="data.bin")] == [item_id]
    resource_path = girder_client.get(f"resource/{item_id}/path", parameters={"type": "item"})
    assert resource_path == f"/collection/{collection['name']}/level1/level2/level3/data.bin"

    (girder_file,) = girder_client.listFile(item_id)
    assert girder_file["size"] == len(payload)
    target = tmp_path / "download.bin"
    girder_client.downloadFile(girder_file["_id"], str(target))
    assert target.read_bytes() == payload
