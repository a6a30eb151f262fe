"""Several workers, one group: two workers of a process work pool (``--limit 1`` each)
run the ``stream`` deployment of ``deployments/prefect.yaml`` at once (its concurrency
limit is 2), as two flow runs that share one consumer group and split the topic's
partitions. The deployment re-keys by file (``rekey_by_file``, issue 23), so the files
are of several chunks: each run's first hop re-keys its share of the source topic to
``<topic>--<group>--by-file``, and its second hop rebuilds the files of its share of
that topic. Files are produced once both runs are members of both groups; every file
must land in Girder exactly once, and each run must have uploaded its share. The runs
are long-running, as ``stream`` is: they are cancelled once everything is in Girder,
and stop gracefully. The Girder API key reaches them through the Secret block only
(the workers' ``GIRDER_API_KEY`` is empty)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from stack.common import STACK_DIR

from tests.integration.girder_checks import assert_exactly_once, default_root_path
from tests.integration.kafka_checks import member_partitions
from tests.integration.local_files import n_chunks, processed_rel_paths, write_tree
from tests.integration.programs import Program, finish, produce_ours

pytestmark = [pytest.mark.integration, pytest.mark.prefect,
              pytest.mark.xdist_group("prefect-deployments")]

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = REPO_ROOT / ".venv" / "bin" / "prefect"
FLOW = "girder-upload-stream"
PARTITIONS = 4
N_FILES = 80
CHUNK_SIZE = 16_384
TIMEOUT = 240.0


def _files() -> dict[str, bytes]:
    """Files of 2 to 4 chunks, in three folders. The producer's key names the chunk, so
    a file's chunks are spread over the source topic's partitions: without the re-key
    hop two runs that split the partitions would each hold part of each file and
    neither could rebuild it."""
    rng = random.Random(15)
    return {f"d{i % 3}/f{i:03d}.bin":
            rng.randbytes(rng.randint(CHUNK_SIZE + 1, 4 * CHUNK_SIZE)) for i in range(N_FILES)}


def _deploy(tmp_path: Path, env: dict[str, str], pool: str, name: str) -> None:
    """``prefect.yaml``'s ``stream``, renamed and on its own pool (the shared names and
    pool stay the demo's)."""
    from girder_upload_stream.prefect_glue import deploying
    import yaml
    text = (REPO_ROOT / "deployments" / "prefect.yaml").read_text()
    assert "  - name: stream\n" in text and "concurrency_limit: 2" in text
    stream, = [d for d in yaml.safe_load(text)["deployments"] if d["name"] == "stream"]
    assert stream["parameters"].get("rekey_by_file") is True, stream["parameters"]
    text = text.replace("  - name: stream\n", f"  - name: {name}\n").replace(
        "name: girder-upload-stream\n      job_variables", f"name: {pool}\n      job_variables")
    prefect_file = STACK_DIR / f"prefect-{pool}.yaml"  # GUS_STACK_DIR, else .stack/
    prefect_file.write_text(text)
    try:
        log = tmp_path / "deploy.log"
        deploying.finish_deploy(deploying.start_deploy(
            REPO_ROOT, prefect_file, env=env, log=log, names=(name,)), log)
    finally:
        prefect_file.unlink()


def _group_members(admin, group: str) -> list[int]:
    """The number of partitions each member of ``group`` is assigned."""
    return [len(partitions) for partitions in member_partitions(admin, group)]


def _items_below(gc, root_id: str) -> int:
    return sum(1 for folder in gc.listFolder(root_id) for _ in gc.listItem(folder["_id"]))


def _wait(condition, what: str, timeout: float = TIMEOUT, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(1)


@pytest.mark.timeout(600)
def test_two_workers_share_one_group_and_every_file_lands_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling
    from girder_upload_stream.prefect_glue import deploying
    from girder_upload_stream.prefect_glue.secrets import save_api_key_block

    env = {**os.environ, **stack_env, **prefect_env}
    pool, name = f"gus-pool-{uuid.uuid4().hex[:6]}", f"stream-{uuid.uuid4().hex[:6]}"
    topic, group, collection = make_topic(partitions=PARTITIONS), make_group(), make_collection()
    files = write_tree(tmp_path / "tree", _files())
    assert {n_chunks(data, CHUNK_SIZE) for data in files.values()} == {2, 3, 4}
    internal_group = f"{group}--by-file"
    deploying.ensure_process_pool(pool)
    save_api_key_block("girder-api-key", stack_env["GIRDER_API_KEY"])
    _deploy(tmp_path, env, pool, name)
    workers = [Program([PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                        "--name", f"{pool}-w{i}", "--limit", "1", "--install-policy", "never"],
                       tmp_path / f"worker-{i}.log", cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                       env={**env, "GIRDER_API_KEY": "", "PREFECT_WORKER_QUERY_SECONDS": "2"})
               for i in (1, 2)]
    programs.extend(workers)
    logs = lambda: "\n".join(w.describe() for w in workers)  # noqa: E731
    runs = [run_deployment(f"{FLOW}/{name}", timeout=0, parameters={
        "topic_name": topic, "consumer_group_id": group,
        "collection_name": collection["name"], "output_dir": str(tmp_path / f"out-{i}")})
            for i in (1, 2)]
    try:
        _wait(lambda: sorted(_group_members(kafka_admin, group)) == [2, 2]
              and sorted(_group_members(kafka_admin, internal_group)) == [2, 2],
              "both runs in both hops' groups with two partitions each", detail=logs)
        started = time.monotonic()
        finish(produce_ours(tmp_path / "tree", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                            tmp_path, chunk_size=CHUNK_SIZE), "produce")
        root = girder_client.resourceLookup(default_root_path(collection["name"], topic))
        _wait(lambda: _items_below(girder_client, root["_id"]) >= len(files),
              f"{len(files)} items in Girder", detail=logs)
        seconds = time.monotonic() - started
    finally:
        with get_client(sync_client=True) as client:
            for run in runs:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
            _wait(lambda: all(client.read_flow_run(r.id).state.is_final() for r in runs),
                  "both runs to stop after cancellation", timeout=120, detail=logs)
            states = [client.read_flow_run(r.id).state.type for r in runs]
            # The label the worker that started the run writes on it; both workers may log
            # "submitting flow run" for a run that only one of them gets to start.
            ran = {str(r.id): client.read_flow_run(r.id).labels.get("prefect.worker.name")
                   for r in runs}
        for worker in workers:  # SIGTERM: a worker has no console to quit from
            worker.proc.send_signal(signal.SIGTERM)
            worker.proc.wait(60)
        kafka_admin.delete_topics([f"{topic}--{internal_group}"], operation_timeout=30)
    assert states == [StateType.CANCELLED] * 2, (states, logs())
    assert_exactly_once(girder_client, root["_id"], files, topic,
                        root_path=default_root_path(collection["name"], topic))
    shares = [processed_rel_paths(tmp_path / f"out-{i}" / "LOGS", topic, group) for i in (1, 2)]
    print(f"[two-workers] {len(files)} files ({sum(map(len, files.values())) / 1e6:.1f} MB), "
          f"{PARTITIONS} partitions: {seconds:.1f}s from the start of the produce to the last "
          f"item in Girder; per run (worker): "
          + ", ".join(f"{len(share)} files ({ran[str(r.id)]})" for r, share in zip(runs, shares)),
          flush=True)
    assert sorted(ran.values()) == [f"{pool}-w1", f"{pool}-w2"], ran
    assert sorted(p for share in shares for p in share) == sorted(files)
    assert all(shares), [len(s) for s in shares]
