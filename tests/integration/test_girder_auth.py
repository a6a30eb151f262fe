"""Authentication, on the real stack.

1. A wrong API key (Girder 5 answers 400) stops both commands at start-up: one clear
   line, exit status 2, no traceback, nothing consumed (no committed offset, no
   registry row), nothing in Girder. A rerun with the right key and the same consumer
   group then uploads every file. The flow itself fails with the same error.
2. A key revoked while the consumer runs (its tokens are revoked with it: 401, then 400
   at the next log-in) is never a file's failure: the files wait, their messages stay
   uncommitted, and once the key is active again every file lands exactly once.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.girder_checks import (assert_exactly_once, assert_uploaded, complete_in_girder, default_root_path, folder_by_path, root_folder_or_none)
from tests.integration.kafka_checks import committed_offsets, end_offsets
from tests.integration.local_files import in_progress_rows, write_tree
from tests.integration.programs import (OUR_CLI, OUR_PROCESSOR, Program, finish, produce_ours, stop_line, wait_for)

pytestmark = pytest.mark.integration

WRONG_KEY = "gus-wrong-key-" + uuid.uuid4().hex


def _files(seed: int) -> dict[str, bytes]:
    return {"notes.txt": f"notes {seed}\n".encode(), "run-1/frame.raw": bytes(range(256)) * 600,
            "run-1/deep/er.json": b'{"a": 1}'}


def _env(stack_env, prefect_env, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GIRDER_API_KEY"}
    env.update(prefect_env)
    env.update(KAFKA_BOOTSTRAP_SERVERS=stack_env["KAFKA_BOOTSTRAP_SERVERS"],
               GIRDER_API_KEY=key, PYTHONIOENCODING="utf-8")
    return env


def _argv(program: str, api_url: str, topic: str, collection: str, group: str,
          out: Path) -> list[str]:
    head = [str(OUR_PROCESSOR)] if program == "GirderUploadStreamProcessor" \
        else [str(OUR_CLI), "run"]
    return [*head, api_url, "--config", "local", "--topic_name", topic, "--collection_name",
            collection, "--consumer_group_id", group, "--output_dir", str(out),
            "--max_idle_seconds", "3", "--update_seconds", "5"]


def _nothing_committed(admin, group: str, topic: str) -> bool:
    return all(offset < 0 for offset in committed_offsets(admin, group, topic).values())


def _collection_exists(gc, name: str) -> bool:
    try:
        gc.get("resource/lookup", parameters={"path": f"/collection/{name}"})
    except Exception:  # noqa: BLE001 - Girder answers 400 for a missing path
        return False
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("program", ["GirderUploadStreamProcessor", "run"])
def test_a_wrong_key_stops_at_start_up_and_a_rerun_with_the_right_key_uploads_all(
        program, tmp_path, stack_env, prefect_env, make_topic, make_group, girder_client,
        kafka_admin, request):
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    topic, group = make_topic(partitions=2), make_group()
    collection = f"gus-auth-{uuid.uuid4().hex[:10]}"  # not created yet: nothing may make it
    request.addfinalizer(lambda: _delete_collection(girder_client, collection))
    files = write_tree(tmp_path / "tree", _files(1))
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path), "our produce")
    out = tmp_path / "out"

    wrong = subprocess.run(_argv(program, api_url, topic, collection, group, out),
                           cwd=tmp_path, env=_env(stack_env, prefect_env, WRONG_KEY),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    shown = wrong.stdout + wrong.stderr
    assert wrong.returncode == 2, shown
    lines = wrong.stderr.strip().splitlines()
    expected = (f"error: cannot start: Girder at {api_url}: it did not accept the API key "
                f"(log in: HTTP 400: Invalid API key.)")
    assert lines and lines[-1] == expected, shown
    assert "Traceback" not in shown and WRONG_KEY not in shown, shown
    assert _nothing_committed(kafka_admin, group, topic)
    assert not _collection_exists(girder_client, collection), "a collection was created"
    assert not list((out / "LOGS").glob("*.csv*")), list((out / "LOGS").glob("*"))
    assert in_progress_rows(out / "LOGS", topic, group) == []

    right = subprocess.run(_argv(program, api_url, topic, collection, group, out),
                           cwd=tmp_path, env=_env(stack_env, prefect_env,
                                                  stack_env["GIRDER_API_KEY"]),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert right.returncode == 0, right.stdout + right.stderr
    line = stop_line(right.stdout)
    assert line["uploaded"] == len(files) and line["failed"] == 0, line
    root_path = default_root_path(collection, topic)
    assert_uploaded(girder_client, folder_by_path(girder_client, root_path)["_id"], files,
                    topic, root_path=root_path)
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic)


@pytest.mark.prefect  # the flow, in-process
@pytest.mark.timeout(180)
def test_the_flow_fails_with_the_start_up_error(stack_env, prefect_env, make_topic,
                                                 make_group, girder_client, kafka_admin,
                                                 tmp_path, monkeypatch):
    from pydantic import SecretStr

    from girder_upload_stream.flows.upload_stream import upload_stream
    from girder_upload_stream.girder.store import GirderStartupError
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    topic, group = make_topic(partitions=1), make_group()
    collection = f"gus-auth-{uuid.uuid4().hex[:10]}"
    state = upload_stream(topic_name=topic, config="local", consumer_group_id=group,
                          girder_api_url=stack_env["GIRDER_API_URL"],
                          girder_api_key=SecretStr(WRONG_KEY), collection_name=collection,
                          output_dir=str(tmp_path / "out"), max_idle_seconds=3,
                          return_state=True)
    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GirderStartupError), error
    assert "did not accept the API key" in str(error) and WRONG_KEY not in state.message
    assert not _collection_exists(girder_client, collection)
    assert _nothing_committed(kafka_admin, group, topic)


# ---------------------------------------------------------------- a key revoked mid-run

@pytest.mark.timeout(420)
def test_a_key_revoked_mid_run_is_never_a_files_failure(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, new_api_key, programs):
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    key_id, key = new_api_key
    out = tmp_path / "out"
    argv = _argv("run", api_url, topic, collection["name"], group, out)
    argv[argv.index("--max_idle_seconds") + 1] = "20"
    program = Program(argv, tmp_path / "run.out", cwd=tmp_path,
                      env=_env(stack_env, prefect_env, key))
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)

    # A first file lands: the upload workers are logged in with a token of the key.
    first = write_tree(tmp_path / "first", {"first.txt": b"before the key is revoked\n"})
    finish(produce_ours(tmp_path / "first", topic, bootstrap, tmp_path), "our produce")
    wait_for(lambda: (root_folder_or_none(girder_client, root_path) is not None and
                      complete_in_girder(girder_client, folder_by_path(
                          girder_client, root_path)["_id"], first) == set(first)),
             "the first file in Girder", program, log_file, timeout=120)

    # Revoke the key (Girder deletes its tokens), then send more files.
    girder_client.put(f"api_key/{key_id}", parameters={"active": False})
    later = write_tree(tmp_path / "later", _files(2))
    finish(produce_ours(tmp_path / "later", topic, bootstrap, tmp_path), "our produce")
    wait_for(lambda: "HTTP 401" in program.output() or "Invalid API key" in program.output(),
             "an upload refused for its token or key", program, log_file, timeout=90)
    wait_for(lambda: "Invalid API key" in program.output(),
             "a new log-in refused", program, log_file, timeout=90)
    root = folder_by_path(girder_client, root_path)
    assert complete_in_girder(girder_client, root["_id"], later) == set(), "uploaded anyway?"
    rows = in_progress_rows(out / "LOGS", topic, group)
    terminal = [(str(r.rel_filepath), r.extra) for r in rows
                if "failed_terminal" in str((r.extra or {}).get("reason", ""))]
    assert not terminal, terminal
    committed = sum(max(o, 0) for o in committed_offsets(kafka_admin, group, topic).values())
    assert committed < sum(end_offsets(bootstrap, topic).values()), \
        "the messages of files waiting for a log-in were committed"

    # The key works again: every file lands, once, and every offset is committed.
    girder_client.put(f"api_key/{key_id}", parameters={"active": True})
    everything = {**first, **later}
    wait_for(lambda: complete_in_girder(girder_client, root["_id"], everything)
             == set(everything), "every file in Girder once the key is active", program,
             log_file, timeout=180)
    assert program.wait(timeout=120) == 0, program.describe(log_file)
    line = stop_line(program.output())
    assert line["failed"] == 0, line
    assert_exactly_once(girder_client, root["_id"], everything, topic, root_path=root_path)
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic)
    assert in_progress_rows(out / "LOGS", topic, group) == []
    assert key not in program.output()


def _delete_collection(gc, name: str) -> None:
    try:
        found = gc.get("resource/lookup", parameters={"path": f"/collection/{name}"})
    except Exception:  # noqa: BLE001 - never created
        return
    gc.delete(f"collection/{found['_id']}")
