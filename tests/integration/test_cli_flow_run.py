"""A command-line run with a Prefect server consumes before its flow run exists
(girder_upload_stream/prefect_glue/late_flow_run.py) and is still recorded whole: the
flow run ends Completed with the run's parameters (never the key), the files uploaded
before it existed are in its artifacts, the units after it are its task runs, and the
lines logged before it are in its log. Against the real stack and Prefect server."""

from __future__ import annotations

import json
import os
import re

import pytest

from girder_upload_stream.registry.artifact_content import artifact_keys
from tests.integration.girder_checks import (assert_uploaded, complete_in_girder,
                                             default_root_path, folder_by_path)
from tests.integration.local_files import write_tree
from tests.integration.programs import OUR_CLI, Program, finish, produce_ours, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

FLOW_RUN_NAME = re.compile(r"Flow run '([^']+)'")
ATTACHED = "the flow run records this run from now on"
RUN_TIMEOUT = 120.0


def _prefect_record(flow_run_name: str) -> dict:
    """The flow run, its task runs, log lines and artifacts on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterName, LogFilter,
                                                LogFilterFlowRunId)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[flow_run_name])))
        assert len(runs) == 1, runs
        run = runs[0]
        ids = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        logs, offset = [], 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[run.id])), limit=200, offset=offset):
            logs += [log.message for log in batch]
            offset += len(batch)
        return {"run": run, "tasks": client.read_task_runs(flow_run_filter=ids),
                "logs": logs,
                "artifacts": client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}


@pytest.mark.timeout(240)
def test_a_cli_run_consumes_at_once_and_its_flow_run_records_it_whole(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs):
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    bootstrap, key = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_KEY"]
    first = write_tree(tmp_path / "first", {"first.txt": b"before the flow run\n"})
    finish(produce_ours(tmp_path / "first", topic, bootstrap, tmp_path), "our produce")
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "GIRDER_API_KEY"}, **prefect_env,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "GIRDER_API_KEY": key}
    program = Program(
        [OUR_CLI, "run", stack_env["GIRDER_API_URL"], "--config", "local", "--topic_name",
         topic, "--collection_name", collection["name"], "--consumer_group_id", group,
         "--output_dir", out, "--max_idle_seconds", "120", "--update_seconds", "1"],
        tmp_path / "run.out", cwd=tmp_path, env=env)
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    wait_for(lambda: ATTACHED in program.output(), "the flow run to take the run over",
             program, log_file, timeout=RUN_TIMEOUT)
    # Produced now, its unit is a task run of the flow run.
    second = write_tree(tmp_path / "second", {"later/second.bin": bytes(range(256)) * 300})
    finish(produce_ours(tmp_path / "second", topic, bootstrap, tmp_path), "our produce")
    files = {**first, **second}
    # Stopped from its console once both files are in Girder: an idle limit would race a
    # slow produce on a loaded machine.
    wait_for(lambda: complete_in_girder(
        girder_client, folder_by_path(girder_client, root_path)["_id"], files) == set(files),
             "both files in Girder", program, log_file, timeout=RUN_TIMEOUT)
    program.send_line("q")
    assert program.wait(RUN_TIMEOUT) == 0, program.describe(log_file)
    output = program.output()
    root = folder_by_path(girder_client, root_path)
    assert complete_in_girder(girder_client, root["_id"], files) == set(files)
    assert_uploaded(girder_client, root["_id"], files, topic, root_path=root_path)
    assert "Finished in state Completed()" in output, program.describe(log_file)
    assert output.strip().splitlines()[-1].startswith(
        "stopped (stop requested)"), program.describe(log_file)

    names = set(FLOW_RUN_NAME.findall(output))
    assert len(names) == 1, program.describe(log_file)
    record = _prefect_record(names.pop())
    run = record["run"]
    assert run.state.is_completed(), run.state
    assert run.parameters["topic_name"] == topic
    assert run.parameters["consumer_group_id"] == group
    uploads = [task for task in record["tasks"] if task.name.startswith("upload unit")]
    assert uploads and all(task.state.is_completed() for task in uploads), record["tasks"]
    assert any(line.startswith(f"(before the flow run started) consuming {topic} ")
               for line in record["logs"]), record["logs"]
    keys = artifact_keys(topic, group)
    by_key = {artifact.key: artifact  # the newest version of each
              for artifact in sorted(record["artifacts"], key=lambda a: a.created)}
    assert {keys.recent_uploads, keys.in_progress, keys.progress, keys.summary} <= set(by_key)
    recent = json.loads(by_key[keys.recent_uploads].data)
    # The file uploaded before the flow run existed too.
    assert sorted(row["rel_filepath"] for row in recent) == sorted(files), recent
    texts = [output, json.dumps(run.parameters), *record["logs"],
             *(str(a.data) for a in record["artifacts"])]
    assert not [text for text in texts if key in text], "the Girder API key was recorded"
