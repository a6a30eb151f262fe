"""Restart on another machine (issue 5, item 4): the local CSV registries are gone, and
the group still resumes from its Kafka offsets, uploading nothing twice. With our
commit metadata's span list (offsets rule 8) the finished files are not read again at
all; with a commit of an earlier build (no span list) they are re-read and recognised
by the latest Prefect artifact of the registry or, without one, by Girder (name and
sha512).

The topic is built message by message so that the situation is exact: a file ``x.bin``
whose last chunk is not produced yet holds partition 0 at its first chunk, while the
files behind it on partition 0 are finished and, on the other partitions, committed
past. The restarted run (fresh output folder, same group) re-reads partition 0 from
``x.bin``'s first chunk; the finished files it meets there could never complete again.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from girder_upload_stream.registry.artifact_content import artifact_keys
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.integration.girder_checks import assert_exactly_once, folder_by_path
from tests.integration.kafka_checks import committed_offsets, drop_span_lists, produce_raw
from tests.integration.local_files import processed_rel_paths
from tests.integration.programs import (Program, consumer_argv, consumer_env, stop_line, write_fault_config)
from tests.integration.girder_checks import default_root_path

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

CHUNK = 4096
RUN_TIMEOUT = 120.0


def build_topic(rng: random.Random) -> tuple[dict[str, bytes], list, tuple]:
    """Files (x.bin's last chunk held back) as ``(key, value, partition)`` messages:
    x's first chunk first on p0, then 16 files of 4 chunks, chunk i on partition i."""
    files = {"x.bin": rng.randbytes(3 * CHUNK)}
    for i in range(16):
        files[f"run/{'a' if i % 2 else 'b'}/f{i:02d}.bin"] = rng.randbytes(4 * CHUNK - i)
    x_chunks = [encode_chunk(c) for c in chunk_file(files["x.bin"], "", CHUNK,
                                                    filename="x.bin")]
    messages = [(*x_chunks[0], 0), (*x_chunks[1], 0)]
    for rel, data in files.items():
        if rel == "x.bin":
            continue
        folder, _, name = rel.rpartition("/")
        for i, chunk in enumerate(chunk_file(data, folder, CHUNK, filename=name)):
            messages.append((*encode_chunk(chunk), i % 4))
    return files, messages, (*x_chunks[2], 2)


def delete_artifacts(api_url: str, topic: str, group: str) -> int:
    """Delete every version of the registry artifacts of ``topic``/``group`` (as if the
    restart used another Prefect server); returns how many were deleted."""
    keys = list(artifact_keys(topic, group))
    found = httpx.post(f"{api_url}/artifacts/filter",
                       json={"artifacts": {"key": {"any_": keys}}, "limit": 200}, timeout=30)
    found.raise_for_status()
    mine = found.json()
    for artifact in mine:
        for attempt in range(10):  # SQLite busy with the flow runs' writes: 503 at times
            answer = httpx.delete(f"{api_url}/artifacts/{artifact['id']}", timeout=30)
            if answer.status_code != 503:
                break
            time.sleep(0.5 * (attempt + 1))
        answer.raise_for_status()
    return len(mine)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("knowledge", ["spans", "girder", "artifact"])
def test_restart_without_local_registry(knowledge, tmp_path: Path, stack_env, prefect_env,
                                        make_topic, make_group, make_collection,
                                        girder_client, kafka_admin):
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    files, messages, x_last = build_topic(random.Random(5))
    where = produce_raw(bootstrap, topic, messages)
    config = write_fault_config(tmp_path / "consumer.config")
    env = consumer_env(stack_env, prefect_env)

    def run(output: Path, name: str) -> dict:
        program = Program(consumer_argv(stack_env["GIRDER_API_URL"], topic,
                                        collection["name"], output, group, config, 4,
                                        "--n_threads", "1"),
                          tmp_path / f"{name}.out", cwd=tmp_path, env=env)
        code = program.wait(RUN_TIMEOUT)
        assert code == 0, program.describe()
        return {**stop_line(program.output()), "output": program.output()}

    first = run(tmp_path / "machine-1", "first")
    assert first["uploaded"] == len(files) - 1, first["output"][-4000:]
    committed = committed_offsets(kafka_admin, group, topic)
    assert committed[0] == where[0][1], committed  # x.bin holds p0 at its first chunk
    ends = {p: sum(1 for q, _ in where if q == p) for p in range(4)}
    assert all(committed[p] == ends[p] for p in (1, 2, 3)), (committed, ends)

    if knowledge == "girder":
        assert delete_artifacts(prefect_env["PREFECT_API_URL"], topic, group) >= 1
    if knowledge != "spans":
        assert drop_span_lists(kafka_admin, group, topic)[0] == f"gus1:hw={ends[0]}"
    produce_raw(bootstrap, topic, [x_last])
    second = run(tmp_path / "machine-2", "second")

    # Only x.bin is new in Girder; the finished files met again are recognised.
    assert second["uploaded"] == 1, second["output"][-4000:]
    assert second["skipped"] == 0, second["output"][-4000:]
    reread_files = {rel for rel in files if rel != "x.bin"}  # every one has a p0 chunk
    if knowledge == "spans":  # p0's commit lists only x.bin's two chunks as pending
        assert second["found"] == 0, second["output"][-4000:]
        assert f"reads 2 of the {ends[0]} message(s)" in second["output"]
        assert "found in Girder by sha512" not in second["output"]
    elif knowledge == "girder":
        assert second["found"] == len(reread_files), second["output"][-4000:]
        assert "found in Girder by sha512" in second["output"]
    else:
        assert second["found"] == 0, second["output"][-4000:]
        assert "taken from the fallback" in second["output"]
    # The overlap is partition 0 from x.bin's first chunk on, plus x's last chunk
    # (with the span list, the finished files' chunks were fetched before the seek
    # over them took effect: such small messages come in one fetch; they are skipped).
    assert second["messages"] == ends[0] + 1, (second["messages"], ends)
    root_path = default_root_path(collection["name"], topic)
    assert_exactly_once(girder_client, folder_by_path(girder_client, root_path)["_id"],
                        files, topic, root_path=root_path)
    end = committed_offsets(kafka_admin, group, topic)
    assert end[0] == ends[0] and end[2] == ends[2] + 1, (end, ends)
    processed = processed_rel_paths(tmp_path / "machine-2" / "LOGS", topic, group)
    assert "x.bin" in processed
    if knowledge == "girder":  # what the lost registry knew is written down again
        assert sorted(set(processed)) == sorted(files), processed
