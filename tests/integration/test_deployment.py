"""Deployments through a local Prefect server: the documented prefect.yaml registers both
deployments without secrets, and a run triggered on a served deployment uploads files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stack.common import STACK_DIR

pytestmark = [pytest.mark.integration, pytest.mark.prefect,
              pytest.mark.xdist_group("prefect-deployments")]

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = REPO_ROOT / ".venv" / "bin" / "prefect"


def _run(argv: list[str], env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _env(stack_env: dict[str, str], prefect_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **stack_env, **prefect_env}


def test_prefect_yaml_registers_stream_and_scheduled_drain(stack_env, prefect_env):
    env = _env(stack_env, prefect_env)
    pool = f"gus-pool-{uuid.uuid4().hex[:6]}"
    _run([str(PREFECT), "work-pool", "create", pool, "--type", "process"], env)
    text = (REPO_ROOT / "deployments" / "prefect.yaml").read_text()
    prefect_file = STACK_DIR / f"prefect-{pool}.yaml"  # GUS_STACK_DIR, else .stack/
    prefect_file.write_text(text.replace("name: girder-upload-stream\n      job_variables",
                                         f"name: {pool}\n      job_variables"))
    try:
        _run([str(PREFECT), "--no-prompt", "deploy", "--all", "--prefect-file",
              str(prefect_file)], env)
    finally:
        prefect_file.unlink()
    from prefect import get_client
    with get_client(sync_client=True) as client:
        stream = client.read_deployment_by_name("girder-upload-stream/stream")
        drain = client.read_deployment_by_name("girder-upload-stream/drain")
    assert stream.work_pool_name == pool and drain.work_pool_name == pool
    assert drain.parameters["max_idle_seconds"] == 60
    # One group, one way of reading it: both re-key by file.
    assert stream.parameters["rekey_by_file"] is True and drain.parameters["rekey_by_file"] is True
    assert [s.schedule.cron for s in drain.schedules] == ["*/15 * * * *"]
    assert not stream.schedules
    with get_client(sync_client=True) as client:
        for deployment in (stream, drain):  # no scheduled runs left behind on the server
            client.delete_deployment(deployment.id)
    for deployment in (stream, drain):
        assert deployment.parameters["girder_api_key_block"] == "girder-api-key"
        assert "girder_api_key" not in deployment.parameters
        assert stack_env["GIRDER_API_KEY"] not in str(deployment.model_dump())


def test_served_deployment_run_uploads_files(stack_env, prefect_env, make_topic, make_group,
                                             girder_client, tmp_path):
    topic = make_topic(partitions=4)
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"alpha" * 1000)
    (source / "sub" / "b.bin").write_bytes(os.urandom(700_000))
    env = _env(stack_env, prefect_env)
    _run([str(REPO_ROOT / ".venv" / "bin" / "girder-upload-stream"), "produce", str(source),
          "--topic_name", topic, "--quiet"], env)

    name = f"serve-{uuid.uuid4().hex[:6]}"
    server = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO_ROOT,
                              env={**env, "GUS_SERVE_NAME": name}, stdin=subprocess.DEVNULL,
                              stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
    collection = f"Deploy-{uuid.uuid4().hex[:6]}"
    try:
        from prefect import get_client
        from prefect.deployments import run_deployment
        deadline = time.monotonic() + 60
        while True:
            try:
                with get_client(sync_client=True) as client:
                    client.read_deployment_by_name(f"girder-upload-stream/{name}")
                break
            except Exception:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        flow_run = run_deployment(
            f"girder-upload-stream/{name}", timeout=240,
            parameters={"topic_name": topic, "consumer_group_id": make_group(),
                        "collection_name": collection, "max_idle_seconds": 3,
                        "output_dir": str(tmp_path / "out")})
        assert flow_run.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
        root = girder_client.resourceLookup(f"/collection/{collection}/{collection}/{topic}")
        sub = girder_client.resourceLookup(f"/collection/{collection}/{collection}/{topic}/sub")
        assert [i["name"] for i in girder_client.listItem(root["_id"])] == ["a.txt"]
        assert [i["name"] for i in girder_client.listItem(sub["_id"])] == ["b.bin"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        try:
            coll = girder_client.resourceLookup(f"/collection/{collection}")
            girder_client.delete(f"collection/{coll['_id']}")
        except Exception:
            pass
