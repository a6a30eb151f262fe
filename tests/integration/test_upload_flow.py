"""The Prefect flow ``upload_stream`` end to end, in-process, against the real stack:
files produced to Kafka (by the real OpenMSIStream 1.8.8 producers and by ours) land in
Girder as items at their mirrored paths, byte for byte, with their metadata.

Each test uses a fresh topic (4 partitions), fresh consumer groups and a fresh Girder
collection. The flow runs under the session's Prefect server and stops once idle.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest


from girder_upload_stream.assembly.reassembly import STAGING_DIR
from tests.integration.girder_checks import (assert_uploaded, download_item, folder_by_path, girder_tree)
from tests.integration.kafka_checks import committed_offsets, end_offsets, topic_messages
from tests.integration.local_files import (CHUNK_SIZE, n_chunks, processed_rel_paths, sha256, write_tree)
from tests.integration.programs import (OMSI_BIN, Program, finish, produce_omsi_file, produce_ours, wait_for, write_omsi_config)

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

MAX_IDLE = 3
METADATA = {"lab": "MSI", "projet": "ünïcødé", "nested": {"run": 7, "tags": ["a", "b"]}}

if not (OMSI_BIN / "DataFileUploadDirectory").exists():
    pytest.fail(f"OpenMSIStream is not installed in {OMSI_BIN.parent} (run `make install`)",
                pytrace=False)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def run_flow(stack_env, prefect_env, tmp_path, monkeypatch):
    """Run the flow in-process until idle; returns its result dict. Defaults: the stack's
    Girder, the bundled ``local`` config, output below ``tmp_path``."""
    from girder_upload_stream.flows.upload_stream import upload_stream
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    # The key by environment, as the CLI hands it over (never a stored flow parameter).
    monkeypatch.setenv("GIRDER_API_KEY", stack_env["GIRDER_API_KEY"])
    runs = iter(range(1, 100))

    def run(topic: str, **options: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            topic_name=topic, config="local", girder_api_url=stack_env["GIRDER_API_URL"],
            n_threads=2,
            output_dir=str(tmp_path / f"out{next(runs)}"), max_idle_seconds=MAX_IDLE,
            max_runtime_seconds=120, interactive=False)
        kwargs.update(options)
        started = time.monotonic()
        result = upload_stream(**kwargs)
        assert isinstance(result, dict), result
        assert result["stopped_because"].startswith("no new message"), result
        result["_wall_seconds"] = time.monotonic() - started
        result["_output_dir"] = Path(kwargs["output_dir"])
        return result

    return run


@pytest.fixture
def kafka_env(stack_env, monkeypatch) -> str:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    return stack_env["KAFKA_BOOTSTRAP_SERVERS"]


def collection_root(gc, collection: dict, *path: str) -> tuple[str, str]:
    """(folder id, Girder path) of ``collection/path...``."""
    girder_path = "/".join(["/collection", collection["name"], *path])
    return folder_by_path(gc, girder_path)["_id"], girder_path


def produce_small_tree(tmp_path: Path, topic: str, bootstrap: str, files: dict[str, bytes],
                       name: str = "tree") -> dict[str, bytes]:
    """Our producer on a tree of ``files``; returns them."""
    root = tmp_path / name
    write_tree(root, files)
    finish(produce_ours(root, topic, bootstrap, tmp_path), "girder-upload-stream produce")
    return files


def small_files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "racine.txt": f"root file {seed}\n".encode(),
        "sous dossier/é/fichier ü.bin": rng.randbytes(CHUNK_SIZE + 11),
        "sous dossier/données.csv": b"x;y\n" + b"".join(f"{i};{i * i}\n".encode()
                                                        for i in range(300)),
        "日本/東京/一.dat": b"\x01",
    }


# ---------------------------------------------- 1. all producers, every mode, 1 and 4 threads

@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["memory", "disk", "both"])
@pytest.mark.parametrize("n_threads", [1, 4])
def test_files_from_all_producers_land_in_girder(n_threads, mode, tmp_path, kafka_env,
                                                 make_topic, make_collection, girder_client,
                                                 run_flow):
    topic = make_topic(partitions=4)
    collection = make_collection()
    rng = random.Random(f"{n_threads}-{mode}")
    src = tmp_path / "src"

    # OpenMSIStream's UploadDataFile: one multi-chunk file at the root.
    single = {"grand fichier é.bin": rng.randbytes(9 * CHUNK_SIZE + 123)}  # 10 chunks
    write_tree(src / "single", single)
    # OpenMSIStream's DataFileUploadDirectory: a nested tree with non-ASCII names.
    omsi_tree = write_tree(src / "omsi_root", {
        "omsi/données/été.txt": "Où est l'été ? Ça dépend.\n".encode() * 7,
        "omsi/données/niveau2/niveau3/profond.bin": rng.randbytes(4 * CHUNK_SIZE + 5),
        "omsi/données/niveau2/c (1) small.json": b'{"k": [1, 2, 3], "\xc3\xa9": null}',
        "omsi/日本/データ.bin": rng.randbytes(3 * CHUNK_SIZE),  # exactly 3 chunks
    })
    # Ours: another nested tree.
    our_tree = write_tree(src / "our_root", {
        "racine à nous.txt": b"ours, at the root\n",
        "ours/ñandú/ü/deep spaced name (1).bin": rng.randbytes(CHUNK_SIZE + 1),
        "ours/ñandú/一.dat": b"\x01",
        "ours/ñandú/zéro.csv": b"a;b\n" + b"".join(f"{i};{rng.random():.5f}\n".encode()
                                                   for i in range(2000)),
    })
    expected = {**single, **omsi_tree, **our_tree}
    n_messages = sum(n_chunks(data) for data in expected.values())

    config = write_omsi_config(tmp_path / "openmsistream.config", kafka_env)
    procs = [(produce_omsi_file(src / "single" / next(iter(single)), topic, config, tmp_path,
                                CHUNK_SIZE), "OpenMSIStream UploadDataFile"),
             (produce_ours(src / "our_root", topic, kafka_env, tmp_path), "our produce")]
    uploader = Program(
        [OMSI_BIN / "DataFileUploadDirectory", src / "omsi_root", "--config", config,
         "--topic_name", topic, "--chunk_size", CHUNK_SIZE, "--upload_existing",
         "--watchdog_lag_time", "1", "--update_seconds", "-1"],
        tmp_path / "DataFileUploadDirectory.out", cwd=tmp_path)
    try:
        for proc, what in procs:
            finish(proc, what)
        wait_for(lambda: sum(end_offsets(kafka_env, topic).values()) >= n_messages,
                 f"{n_messages} chunk messages on {topic}", uploader)
    finally:
        code = uploader.stop()
    assert code == 0, f"DataFileUploadDirectory did not stop cleanly\n{uploader.describe()}"
    offsets = end_offsets(kafka_env, topic)
    assert sum(offsets.values()) == n_messages, offsets
    assert all(offsets[p] > 0 for p in range(4)), f"chunks not spread over 4 partitions: {offsets}"

    out_dir = tmp_path / f"out-{mode}"
    result = run_flow(topic, collection_name=collection["name"], metadata=METADATA,
                      n_threads=n_threads, mode=mode, output_dir=str(out_dir))

    # Several consumers join the group one by one: a rebalance may hand a partition over
    # before its offsets could be committed, so the new owner reads those messages again.
    if n_threads == 1:
        assert result["messages_read"] == n_messages, result
    assert result["messages_read"] >= n_messages, result
    assert result["messages_processed"] == n_messages, result
    assert result["files_uploaded"] == len(expected), result
    assert result["files_failed"] == 0 and result["messages_rejected"] == 0, result
    assert result["pending_messages"] == 0, result
    root_id, root_path = collection_root(girder_client, collection, collection["name"], topic)
    assert_uploaded(girder_client, root_id, expected, topic, METADATA, root_path=root_path)
    # The default path '{collection}/{topic}' makes two folders, as OpenMSIStream 1.8.8:
    # the topic's has the metadata, the first one (named like the collection) has none.
    root_meta = girder_client.getFolder(root_id).get("meta") or {}
    assert root_meta.get("KafkaTopic") == topic and "checksum" not in root_meta, root_meta
    first = folder_by_path(girder_client, f"/collection/{collection['name']}/{collection['name']}")
    assert not first.get("meta"), first.get("meta")

    # Disk mode rebuilds files only in its staging folder, and deletes them (once
    # uploaded, or when the run ends); both mode keeps a local copy of each.
    rebuilt = {p.relative_to(out_dir).as_posix(): p for p in out_dir.rglob("*")
               if p.is_file() and p.relative_to(out_dir).parts[0] not in ("LOGS", STAGING_DIR)}
    if mode != "both":
        assert not rebuilt, f"{mode} mode left files on disk: {sorted(rebuilt)}"
    else:
        assert sorted(rebuilt) == sorted(expected), f"{mode}: files on disk {sorted(rebuilt)}"
        for rel, data in expected.items():
            assert rebuilt[rel].read_bytes() == data, f"{mode}: {rel} differs on disk"
    registry = processed_rel_paths(out_dir / "LOGS", topic, result["group_id"])
    assert sorted(registry) == sorted(expected), registry


# ------------------------------------------------- 1b. the memory budget spills, loses nothing

@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["memory", "both"])
def test_files_over_the_memory_budget_are_spilled_and_land_whole(
        mode, tmp_path, kafka_env, make_topic, make_collection, girder_client, run_flow):
    """A 1 MiB budget and files of 3 to 6 MiB spread over 4 partitions: the files being
    rebuilt are spilled to the staging folder, every file lands byte for byte with its
    metadata, and nothing is left in the staging folder."""
    topic = make_topic(partitions=4)
    collection = make_collection()
    rng = random.Random(f"budget-{mode}")
    files = {f"big/f{i}.bin": rng.randbytes((3 + i) * (1 << 20) + i) for i in range(4)}
    produce_small_tree(tmp_path, topic, kafka_env, files)
    out_dir = tmp_path / f"out-budget-{mode}"
    result = run_flow(topic, collection_name=collection["name"], metadata=METADATA,
                      mode=mode, output_dir=str(out_dir), memory_budget_mb=1)
    assert result["files_uploaded"] == len(files), result
    assert result["files_spilled"] >= 1, result
    assert result["pending_messages"] == 0 and result["files_failed"] == 0, result
    root_id, root_path = collection_root(girder_client, collection, collection["name"], topic)
    assert_uploaded(girder_client, root_id, files, topic, METADATA, root_path=root_path)
    assert not (out_dir / STAGING_DIR).exists(), list((out_dir / STAGING_DIR).rglob("*"))


# ------------------------------------------------------------------ 2. --download_regex

@pytest.mark.timeout(120)
def test_download_regex_uploads_only_matching_files(tmp_path, kafka_env, make_topic,
                                                    make_collection, girder_client, run_flow):
    topic = make_topic(partitions=4)
    collection = make_collection()
    files = produce_small_tree(tmp_path, topic, kafka_env, {
        **small_files(1), "keep/garde.bin": random.Random(2).randbytes(2 * CHUNK_SIZE),
        "keep/sub/x.txt": b"x", "skip/keep_not.txt": b"not me"})
    regex = r"^(keep/|sous dossier/é/)"
    wanted = {rel: data for rel, data in files.items()
              if rel.startswith(("keep/", "sous dossier/é/"))}
    assert 0 < len(wanted) < len(files)

    result = run_flow(topic, collection_name=collection["name"], download_regex=regex)

    assert result["files_uploaded"] == len(wanted), result
    # (at least: a rebalance may make a file's first chunk be read again)
    assert result["files_skipped_by_regex"] >= len(files) - len(wanted), result
    assert result["messages_read"] >= sum(n_chunks(d) for d in files.values()), result
    assert result["messages_processed"] == sum(n_chunks(d) for d in wanted.values()), result
    root_id, root_path = collection_root(girder_client, collection, collection["name"], topic)
    tree = assert_uploaded(girder_client, root_id, wanted, topic, root_path=root_path)
    assert "skip" not in tree.folders and "日本" not in tree.folders, sorted(tree.folders)


# ------------------------------------------------------------------ 3. root folder choice

@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["folder_id", "collection_name", "collection_and_path"])
def test_root_folder(how, tmp_path, kafka_env, make_topic, make_collection, girder_client,
                     run_flow, request):
    topic = make_topic(partitions=4)
    files = produce_small_tree(tmp_path, topic, kafka_env, small_files(3))
    if how == "folder_id":
        collection = make_collection()
        parent = girder_client.createFolder(collection["_id"], "given", parentType="collection")
        root = girder_client.createFolder(parent["_id"], "root by id")
        options = {"girder_root_folder_id": root["_id"]}
        root_path = f"/collection/{collection['name']}/given/root by id"
        made_by_flow: list[str] = []
    elif how == "collection_name":
        # A collection that does not exist yet: the flow creates it (public), then the
        # folders '{name}/{topic}' below it.
        name = f"gus-{topic}"
        request.addfinalizer(lambda: _delete_collection(girder_client, name))
        options = {"collection_name": name}
        root_path = f"/collection/{name}/{name}/{topic}"
        made_by_flow = [root_path]
    else:
        # Every part of the path is a folder below the collection, none a collection.
        collection = make_collection()
        options = {"collection_name": collection["name"],
                   "girder_root_folder_path": "niveau un/niveau deux"}
        root_path = f"/collection/{collection['name']}/niveau un/niveau deux"
        made_by_flow = [f"/collection/{collection['name']}/niveau un", root_path]

    result = run_flow(topic, metadata={"root": how}, **options)

    assert result["files_uploaded"] == len(files), result
    root = folder_by_path(girder_client, root_path)
    assert_uploaded(girder_client, root["_id"], files, topic, {"root": how},
                    root_path=root_path)
    for path in made_by_flow:  # folders the flow created on the root path have the metadata
        meta = folder_by_path(girder_client, path).get("meta") or {}
        assert meta.get("KafkaTopic") == topic and meta.get("root") == how, (path, meta)
        assert "checksum" not in meta, (path, meta)
    if how == "folder_id":
        assert not (girder_client.getFolder(root["_id"]).get("meta") or {}), \
            "the given root folder's metadata was changed"
    if how == "collection_name":
        created = girder_client.get(
            "resource/lookup", parameters={"path": f"/collection/{name}"})
        assert created["public"] is True, created
        assert not (folder_by_path(girder_client, f"/collection/{name}/{name}").get("meta")), \
            "the first folder, named like the collection, has no metadata (OpenMSIStream)"


def _delete_collection(gc, name: str) -> None:
    try:
        collection = gc.get("resource/lookup", parameters={"path": f"/collection/{name}"})
    except Exception:  # noqa: BLE001 - not created (the test failed before)
        return
    gc.delete(f"collection/{collection['_id']}")


# ------------------------------------- 4. re-produced files skipped; changed files; registries

@pytest.mark.timeout(180)
def test_reproduced_and_changed_files(tmp_path, kafka_env, make_topic, make_group,
                                      make_collection, girder_client, run_flow, caplog):
    topic = make_topic(partitions=4)
    collection = make_collection()
    files = small_files(4)
    n_messages = sum(n_chunks(d) for d in files.values())
    produce_small_tree(tmp_path, topic, kafka_env, files)
    first = run_flow(topic, collection_name=collection["name"], consumer_group_id=make_group())
    assert first["files_uploaded"] == len(files), first
    root_id, root_path = collection_root(girder_client, collection, collection["name"], topic)
    before = assert_uploaded(girder_client, root_id, files, topic, root_path=root_path)

    # The same files again, read by a NEW group (from the start: both copies): no new item.
    produce_small_tree(tmp_path, topic, kafka_env, files)
    group = make_group()
    second = run_flow(topic, collection_name=collection["name"], consumer_group_id=group)
    assert second["messages_read"] >= 2 * n_messages, second
    assert second["files_uploaded"] == 0 and second["files_failed"] == 0, second
    assert second["files_skipped"] == 2 * len(files), second  # each copy found identical
    after = girder_tree(girder_client, root_id)
    assert {r: (i["_id"], i["size"]) for r, i in after.items.items()} == \
        {r: (i["_id"], i["size"]) for r, i in before.items.items()}, "items were re-created"
    assert after.folders.keys() == before.folders.keys(), sorted(after.folders)
    logs = second["_output_dir"] / "LOGS"
    assert (logs / f"processed_from_{topic}_by_{group}.csv").is_file(), sorted(logs.iterdir())
    registry = processed_rel_paths(logs, topic, group)
    assert sorted(registry) == sorted(list(files) * 2), registry  # produced twice: twice

    # A changed file with the same name, same group: only the new messages are read, and
    # without --replace_existing the old content stays (skipped with a warning).
    changed_rel = "sous dossier/é/fichier ü.bin"
    changed = {changed_rel: random.Random(44).randbytes(2 * CHUNK_SIZE + 3)}
    assert changed[changed_rel] != files[changed_rel]
    produce_small_tree(tmp_path, topic, kafka_env, changed, name="changed")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream"):
        third = run_flow(topic, collection_name=collection["name"], consumer_group_id=group,
                         n_threads=1)  # one consumer: no rebalance re-reads to count
    assert third["messages_read"] == n_chunks(changed[changed_rel]), \
        f"the group's committed offsets were not used: {third}"
    assert (third["files_uploaded"], third["files_skipped"], third["files_skipped_different"]) \
        == (0, 0, 1), third  # counted as what it is, not as "already in Girder"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and changed_rel in r.getMessage()]
    assert any("different content" in w for w in warnings), \
        f"no 'different content' warning for {changed_rel}: {[r.getMessage() for r in caplog.records]}"
    kept = girder_tree(girder_client, root_id).items[changed_rel]
    assert download_item(girder_client, kept) == files[changed_rel], "the old content was replaced"
    assert kept["meta"]["checksum"] == {"sha256": sha256(files[changed_rel])}, kept["meta"]

    # With --replace_existing the content (and its checksum) is replaced.
    produce_small_tree(tmp_path, topic, kafka_env, changed, name="changed")
    fourth = run_flow(topic, collection_name=collection["name"], consumer_group_id=group,
                      replace_existing=True, n_threads=1)
    assert fourth["files_uploaded"] == 1 and fourth["files_skipped"] == 0, fourth
    replaced = girder_tree(girder_client, root_id)
    assert sorted(replaced.items) == sorted(files), sorted(replaced.items)
    item = replaced.items[changed_rel]
    assert item["_id"] == before.items[changed_rel]["_id"], \
        "the item was re-created instead of its content replaced"
    assert download_item(girder_client, item) == changed[changed_rel], "content not replaced"
    assert item["meta"]["checksum"] == {"sha256": sha256(changed[changed_rel])}, item["meta"]
    assert item["meta"]["KafkaTopic"] == topic, item["meta"]


# ------------------------------------------------------------------------- 5. heartbeats

@pytest.mark.timeout(120)
def test_heartbeats(tmp_path, kafka_env, make_topic, make_group, make_collection, run_flow):
    topic = make_topic(partitions=4)
    heartbeat_topic = make_topic(partitions=1)
    collection = make_collection()
    files = produce_small_tree(tmp_path, topic, kafka_env, {
        **small_files(5), "big/b.bin": random.Random(5).randbytes(6 * CHUNK_SIZE)})
    messages = topic_messages(kafka_env, topic, make_group(),
                              sum(n_chunks(d) for d in files.values()))
    n_bytes = sum(len(m.value()) for m in messages)
    program_id = f"hb-{topic}"

    result = run_flow(topic, collection_name=collection["name"],
                      heartbeat_topic_name=heartbeat_topic, heartbeat_program_id=program_id,
                      heartbeat_interval_secs=1)
    assert result["files_uploaded"] == len(files), result

    n_beats = sum(end_offsets(kafka_env, heartbeat_topic).values())
    beats = topic_messages(kafka_env, heartbeat_topic, make_group(), n_beats, timeout=20)
    assert len(beats) == n_beats, (len(beats), n_beats)
    assert len(beats) >= 2, f"expected a heartbeat per second over a {MAX_IDLE}s+ run: {beats}"
    values = []
    for beat in beats:
        assert beat.key() == f"{program_id}_heartbeat".encode(), beat.key()
        value = json.loads(beat.value())
        for key in ("timestamp", "n_messages_read", "n_bytes_read", "n_messages_processed",
                    "n_bytes_processed"):
            assert key in value, (key, value)
        values.append(value)
    for value in values:  # ISO 8601 in UTC with its offset, as OpenMSIStream 1.8.8's
        assert datetime.fromisoformat(value["timestamp"]).utcoffset() == timedelta(0), value
    totals = {k: sum(v[k] for v in values) for k in
              ("n_messages_read", "n_bytes_read", "n_messages_processed", "n_bytes_processed")}
    # The heartbeats add up to the run's own counts ...
    assert totals == {"n_messages_read": result["messages_read"],
                      "n_bytes_read": result["bytes_read"],
                      "n_messages_processed": result["messages_processed"],
                      "n_bytes_processed": result["bytes_processed"]}, (totals, result, values)
    # ... which are the topic's messages (reading may repeat some after a rebalance;
    # processing counts each message of an uploaded file once).
    assert totals["n_messages_processed"] == len(messages), (totals, len(messages))
    assert totals["n_bytes_processed"] == n_bytes, (totals, n_bytes)
    assert totals["n_messages_read"] >= len(messages), (totals, len(messages))
    assert totals["n_bytes_read"] >= n_bytes, (totals, n_bytes)


# --------------------------------------------------------------------- 7. committed offsets

@pytest.mark.timeout(120)
def test_committed_offsets_reach_the_end(tmp_path, kafka_env, kafka_admin, make_topic,
                                         make_group, make_collection, girder_client, run_flow):
    topic = make_topic(partitions=4)
    collection = make_collection()
    rng = random.Random(7)
    files = produce_small_tree(tmp_path, topic, kafka_env, {
        **small_files(7), **{f"many/f{i:02d}.bin": rng.randbytes(100 + i) for i in range(12)}})
    ends = end_offsets(kafka_env, topic)
    assert all(ends[p] > 0 for p in range(4)), f"not every partition has messages: {ends}"
    group = make_group()

    result = run_flow(topic, collection_name=collection["name"], consumer_group_id=group,
                      n_threads=3)
    assert result["files_uploaded"] == len(files), result
    assert result["group_id"] == group

    committed = committed_offsets(kafka_admin, group, topic)
    assert committed == ends, f"committed {committed} != end offsets {ends}"
    root_id, _ = collection_root(girder_client, collection, collection["name"], topic)
    assert sorted(girder_tree(girder_client, root_id).items) == sorted(files)
