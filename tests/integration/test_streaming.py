"""Streamed uploads against the real stack: a big file whose last chunk arrives first
streams into Girder while the rest arrives (memory and disk mode) and lands whole with
its metadata; a file whose sha512 does not match leaves no item, no file, no
unfinished upload and no folder made for it; a consumer SIGKILLed in the middle of a streamed upload leaves an
unfinished upload that the restart removes, ending with exactly one complete file; a
stream that breaks after its first block was sent and let go of (its upload removed from
Girder) fails the file, and the next run of the group rebuilds it from its messages:
exactly one complete file.

The files are 24 MiB in 512 KiB chunks (3 blocks of 8 MiB), streamed from 8 MiB on
(``--stream_min_mb 8``). Their last chunk is produced first, so the size is known from
the first message on; the rest follows in order.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
from dataclasses import replace
from typing import Any

import pytest

from girder_upload_stream.girder.streaming import TAG_FIELD
from girder_upload_stream.kafka.clients import ChunkProducer
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.integration.girder_checks import default_root_path, folder_by_path
from tests.integration.programs import (Program, consumer_argv, consumer_env, stop_line,
                                        wait_for)
from tests.integration.test_upload_flow import run_flow  # noqa: F401 - the fixture

# Girder's unfinished uploads are looked up by the file's fixed name (an abandoned
# stream's item may be gone): one worker runs these tests, one after the other.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("streamed-big-file")]

SIZE = 24 * (1 << 20) + 12_345
CHUNK = 1 << 19
NAME = "streamed/big file.bin"


def _produce(bootstrap: str, topic: str, data: bytes, wrong_hash: bool = False,
             part: slice = slice(None)) -> int:
    """The file's chunks, its last first (``part`` of that order only)."""
    chunks = list(chunk_file(data, "streamed", CHUNK, filename="big file.bin"))
    if wrong_hash:  # every chunk consistent, the file's sha512 another file's
        other = hashlib.sha512(b"not this file").digest()
        chunks = [replace(c, file_hash=other) for c in chunks]
    chunks = [chunks[-1], *chunks[:-1]][part]
    producer = ChunkProducer({"bootstrap.servers": bootstrap}, topic)
    for chunk in chunks:
        producer.send(*encode_chunk(chunk), rel_path=NAME)
    report = producer.flush()
    assert report.acked == len(chunks), report
    return len(chunks)


def _unfinished(gc, item_ids: set[str] | None = None, name: str | None = None) -> list[dict]:
    """Girder's unfinished uploads below the given items, or of that file name."""
    uploads = gc.get("system/uploads")
    return [u for u in uploads if (item_ids is not None and u.get("parentId") in item_ids)
            or (name is not None and u.get("name") == name)]


def _items(gc, collection: dict, topic: str) -> list[dict]:
    root = folder_by_path(gc, f"{default_root_path(collection['name'], topic)}/streamed")
    return list(gc.listItem(root["_id"]))


def _check_one_file(gc, collection: dict, topic: str, data: bytes) -> dict:
    items = _items(gc, collection, topic)
    assert [i["name"] for i in items] == ["big file.bin"], items
    [item] = items
    files = list(gc.listFile(item["_id"]))
    assert len(files) == 1, files
    assert files[0]["size"] == len(data), files
    assert files[0]["sha512"] == hashlib.sha512(data).hexdigest()
    meta = gc.getItem(item["_id"]).get("meta", {})
    assert meta.get("checksum", {}).get("sha256") == hashlib.sha256(data).hexdigest(), meta
    assert meta.get("KafkaTopic") == topic and TAG_FIELD not in meta, meta
    # Below this item only: a test running beside this one may have an upload of the
    # same name open in its own collection.
    assert _unfinished(gc, {item["_id"]}) == []
    return item


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_big_file_streams_into_girder_and_lands_with_its_metadata(
        mode, tmp_path, stack_env, make_topic, make_collection, girder_client, run_flow):
    topic, collection = make_topic(partitions=4), make_collection()
    data = random.Random(f"stream-{mode}").randbytes(SIZE)
    n = _produce(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic, data)
    result: dict[str, Any] = run_flow(topic, collection_name=collection["name"], mode=mode,
                                      stream_min_mb=8)
    assert result["streams_opened"] == 1, result
    assert result["files_uploaded"] == 1 and result["messages_processed"] == n, result
    assert result["pending_messages"] == 0, result
    _check_one_file(girder_client, collection, topic, data)


@pytest.mark.timeout(240)
def test_a_streamed_file_with_a_mismatched_hash_leaves_nothing_in_girder(
        tmp_path, stack_env, make_topic, make_collection, girder_client, run_flow):
    topic, collection = make_topic(partitions=4), make_collection()
    data = random.Random("mismatch").randbytes(SIZE)
    _produce(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic, data, wrong_hash=True)
    result = run_flow(topic, collection_name=collection["name"], stream_min_mb=8)
    assert result["streams_opened"] == 1, result
    assert result["files_failed"] == 1 and result["files_uploaded"] == 0, result
    # What Girder shows afterwards: the folder the stream created, no item, no upload.
    root = folder_by_path(girder_client, default_root_path(collection["name"], topic))
    folders = {f["name"]: f for f in girder_client.listFolder(root["_id"])}
    items = list(girder_client.listItem(folders["streamed"]["_id"])) if "streamed" in folders \
        else []
    print(f"[stream mismatch] Girder: folders {sorted(folders)}, items {items}, unfinished "
          f"uploads {_unfinished(girder_client, name='big file.bin')}", flush=True)
    assert items == [] and "streamed" not in folders  # the folder made for it is gone too
    assert _unfinished(girder_client, name="big file.bin") == []


@pytest.mark.timeout(300)
def test_sigkill_mid_stream_then_restart_leaves_one_complete_file_and_no_upload(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs):
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    data = random.Random("kill").randbytes(SIZE)
    _produce(bootstrap, topic, data)
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                         tmp_path / "out", group, "local", 5, "--stream_min_mb", "8")
    killed = Program(argv, tmp_path / "killed.out", cwd=tmp_path,
                     env=consumer_env(stack_env, prefect_env, "stream.sent=1"),
                     stdin=subprocess.DEVNULL)
    programs.append(killed)
    assert killed.wait(150) == -signal.SIGKILL, killed.describe()
    assert "failpoint stream.sent reached" in killed.output(), killed.describe()
    [item] = _items(girder_client, collection, topic)
    left = _unfinished(girder_client, {item["_id"]})
    print(f"[stream kill] after the kill: item meta {item.get('meta')}, files "
          f"{list(girder_client.listFile(item['_id']))}, unfinished uploads "
          f"{[(u['_id'], u['received'], u['size']) for u in left]}", flush=True)
    assert len(left) == 1 and left[0]["received"] == 8 << 20, left
    assert item.get("meta", {}).get(TAG_FIELD) == group

    again = Program(argv, tmp_path / "again.out", cwd=tmp_path,
                    env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(again)
    assert again.wait(150) == 0, again.describe()
    summary = stop_line(again.output())
    assert summary["reason"].startswith("no new message"), summary
    _check_one_file(girder_client, collection, topic, data)
    assert _unfinished(girder_client, {item["_id"]}) == []


@pytest.mark.timeout(300)
def test_a_stream_broken_after_its_bytes_were_let_go_is_rebuilt_by_the_next_run(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs):
    """The first 8 MiB block is sent and let go of (memory mode); then the upload is
    removed from Girder (as an administrator clearing unfinished uploads would) before
    the rest arrives. The run cannot upload the file (it no longer holds its first bytes):
    it fails it without committing its messages; the next run of the group reads them
    again and the file lands once."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    data = random.Random("let-go").randbytes(SIZE)
    first = 1 + 20  # the last chunk, then 10 MiB from offset 0: one block to send
    n = _produce(bootstrap, topic, data, part=slice(0, first))
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                         tmp_path / "out", group, "local", 5, "--stream_min_mb", "8",
                         "--mode", "memory")
    broken = Program(argv, tmp_path / "broken.out", cwd=tmp_path,
                     env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(broken)

    def own_uploads() -> list[dict]:  # not those of a test running beside this one
        try:
            items = _items(girder_client, collection, topic)
        except Exception:  # noqa: BLE001 - its folder is not there yet
            return []
        return _unfinished(girder_client, {i["_id"] for i in items})

    wait_for(lambda: any(u["received"] == 8 << 20 for u in own_uploads()),
             "the first streamed block in Girder", broken)
    [upload] = own_uploads()
    girder_client.delete(f"file/upload/{upload['_id']}")
    n += _produce(bootstrap, topic, data, part=slice(first, None))
    assert broken.wait(150) == 0, broken.describe()
    summary = stop_line(broken.output())
    assert summary["uploaded"] == 0 and summary["failed"] == 1, summary
    assert "let go" in broken.output(), broken.describe()

    again = Program(argv, tmp_path / "again.out", cwd=tmp_path,
                    env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(again)
    assert again.wait(150) == 0, again.describe()
    summary = stop_line(again.output())
    assert summary["uploaded"] == 1 and summary["failed"] == 0, summary
    assert summary["messages"] >= n, summary  # every message read again
    _check_one_file(girder_client, collection, topic, data)
