"""The registries as Prefect artifacts, end to end: the flow runs in-process against the
real stack and the session's Prefect server, then the artifacts are read back by key
(tables, progress, markdown summary), and a second run of the same group with an empty
logs folder (a restart on another machine) gets its fallback from the artifact."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.integration.local_files import CHUNK_SIZE, n_chunks, write_tree
from tests.integration.programs import finish, produce_ours

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

MAX_IDLE = 3


def read_artifacts(key: str) -> list[Any]:
    """Every version of the artifact ``key``, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC)


def table_of(artifact: Any) -> list[dict[str, Any]]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture
def run_flow(stack_env, prefect_env, tmp_path, monkeypatch):
    """Run the flow in-process until idle; returns its result dict."""
    from girder_upload_stream.flows.upload_stream import upload_stream
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    monkeypatch.setenv("GIRDER_API_KEY", stack_env["GIRDER_API_KEY"])

    def run(topic: str, **options: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            topic_name=topic, config="local", girder_api_url=stack_env["GIRDER_API_URL"],
            n_threads=2, max_idle_seconds=MAX_IDLE, max_runtime_seconds=120,
            interactive=False)
        kwargs.update(options)
        result = upload_stream(**kwargs)
        assert result["stopped_because"].startswith("no new message"), result
        return result

    return run


@pytest.fixture
def fallback_spy(monkeypatch):
    """Records what the flow's registry fallback returned, by wrapping the function the
    flow module calls (its lambda looks the name up at call time)."""
    from girder_upload_stream.prefect_glue.artifacts import load_registry_fallback
    from girder_upload_stream.flows import upload_stream as flow_module
    calls: list[tuple[tuple[str, str], set]] = []

    def spy(topic: str, group: str) -> set[tuple[str, str]]:
        found = load_registry_fallback(topic, group)
        calls.append(((topic, group), found))
        return found

    monkeypatch.setattr(flow_module, "load_registry_fallback", spy)
    return calls


def produce_garbage(bootstrap: str, topic: str) -> None:
    """One message that is not a chunk: a failed row (with its reason) in the registry."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"not a chunk key", value=b"\x00not msgpack\xff", partition=0)
    assert producer.flush(30) == 0


@pytest.mark.timeout(240)
def test_artifacts_of_a_run_and_the_fallback_of_a_restart(
        tmp_path: Path, stack_env, make_topic, make_group, make_collection, run_flow,
        fallback_spy):
    from girder_upload_stream.registry.artifact_content import artifact_keys
    from girder_upload_stream.prefect_glue.artifacts import load_registry_fallback
    from girder_upload_stream.kafka.clients import ConsumerGroup
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    rng = random.Random(11)
    files = write_tree(tmp_path / "tree", {
        "racine.txt": b"root\n", "sous dossier/é/données.bin": rng.randbytes(3 * CHUNK_SIZE + 7),
        "日本/一.dat": b"\x01", "a/b/c/deep.csv": b"x;y\n1;2\n"})
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path), "produce")
    produce_garbage(bootstrap, topic)
    n_messages = sum(n_chunks(data) for data in files.values()) + 1
    keys = artifact_keys(topic, group)
    expected_keys = {(rel, hashlib.sha512(data).hexdigest()[:32]) for rel, data in files.items()}

    # ---- first run: the artifacts of a normal run
    # One consumer: no rebalance, after which a partition's position (hence the lag)
    # stays unknown until a new message comes.
    first = run_flow(topic, consumer_group_id=group, collection_name=collection["name"],
                     output_dir=str(tmp_path / "out1"), n_threads=1)
    assert first["files_uploaded"] == len(files) and first["messages_rejected"] == 1, first
    assert first["messages_read"] >= n_messages, first

    # Tables: at most one version per 30 s interval, plus the final one.
    max_versions = 1 + int(first["seconds"] // 30)
    recent = read_artifacts(keys.recent_uploads)
    assert 1 <= len(recent) <= max_versions, (len(recent), first["seconds"])
    flow_run_id = recent[0].flow_run_id
    assert flow_run_id is not None and recent[0].type == "table"
    rows = table_of(recent[0])
    assert {(r["rel_filepath"], r["generation"]) for r in rows} == expected_keys
    for row in rows:
        data = files[row["rel_filepath"]]
        assert row["outcome"] == "uploaded", row
        assert row["sha256"] == hashlib.sha256(data).hexdigest(), row
        assert row["item_id"] and row["n_chunks"] == n_chunks(data), row
        assert row["filename"] == row["rel_filepath"].rsplit("/", 1)[-1], row
    assert [r["processed_at"] for r in rows] == sorted((r["processed_at"] for r in rows),
                                                       reverse=True)

    in_progress = read_artifacts(keys.in_progress)
    assert 1 <= len(in_progress) <= max_versions and in_progress[0].flow_run_id == flow_run_id
    [failed] = table_of(in_progress[0])  # every file landed: only the bad message is left
    assert failed["status"] == "failed" and failed["reason"], failed

    progress = read_artifacts(keys.progress)
    assert len(progress) == 1, "the progress artifact is created once, then updated"
    assert progress[0].type == "progress" and progress[0].flow_run_id == flow_run_id
    assert f"{first['messages_read']:,} message(s) read" in progress[0].description
    # This member's partitions and their lag, one row each (issue 23 §4): all 4, read.
    rows = [f"| source | {topic} | {group} | {p} | 0 |" for p in range(4)]
    assert all(row in progress[0].description.splitlines() for row in rows), progress[0]
    if callable(getattr(ConsumerGroup, "lag", None)):
        assert float(progress[0].data) == 100.0, progress[0]
    else:  # a group that cannot tell its lag: the counts alone, in the description
        assert "lag unknown" in progress[0].description, progress[0]

    summary = read_artifacts(keys.summary)
    assert len(summary) == 1 and summary[0].type == "markdown"
    text = summary[0].data
    assert f"| files uploaded | {len(files)} |" in text, text
    assert "| messages rejected | 1 |" in text and "## Failed files: 1" in text, text
    assert str((tmp_path / "out1" / "LOGS").resolve()) in text, text
    assert f"processed_from_{topic}_by_{group}.csv" in text, text

    # ---- the fallback, read directly: the files produced, with their generations
    assert load_registry_fallback(topic, group) == expected_keys
    assert load_registry_fallback(topic, make_group()) == set()  # another group: nothing

    # ---- second run, same group, EMPTY logs folder: the flow asks the artifact
    second = run_flow(topic, consumer_group_id=group, collection_name=collection["name"],
                      output_dir=str(tmp_path / "out2"), logs_dir=str(tmp_path / "logs2"))
    assert second["files_uploaded"] == 0 and second["files_failed"] == 0, second
    assert fallback_spy == [((topic, group), set()), ((topic, group), expected_keys)]
    # The second run processed nothing: its empty table did not replace the first one's.
    assert [a.id for a in read_artifacts(keys.recent_uploads)] == [recent[0].id]
    assert load_registry_fallback(topic, group) == expected_keys
    assert len(read_artifacts(keys.summary)) == 2 and len(read_artifacts(keys.progress)) == 2
    assert table_of(read_artifacts(keys.in_progress)[0]) == []  # the new folder's table
