"""The consumer's command lines, as subprocesses against the real stack:
``GirderUploadStreamProcessor`` (OpenMSIStream's drop-in) and ``girder-upload-stream run``.

Every run uses a fresh topic, group and Girder collection, and the session's Prefect
server (``PREFECT_API_URL``), so no run starts its own ephemeral server. Programs are
stopped by their own PID only.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.girder_checks import assert_uploaded, folder_by_path, girder_tree
from tests.integration.local_files import CHUNK_SIZE, n_chunks, processed_rel_paths, write_tree
from tests.integration.programs import (OUR_CLI, OUR_PROCESSOR, Program, finish, produce_ours, wait_for, write_omsi_config)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 90.0
SUPPORTED_OPTIONS = [
    "girder_api_url", "girder_api_key", "--config", "--topic_name", "--girder_root_folder_id",
    "--collection_name", "--girder_root_folder_path", "--metadata", "--replace_existing",
    "--n_threads", "--consumer_group_id", "--download_regex", "--output_dir", "--mode",
    "--logger_stream_level", "--logger_file_level", "--logger_file_path", "--update_seconds",
    "--heartbeat_topic_name", "--heartbeat_program_id", "--heartbeat_interval_secs",
    "--log_topic_name", "--log_program_id", "--log_interval_secs",
    "--treat_undecryptable_as_plaintext", "--max_wait_per_decrypt",
    "--max_initial_wait_per_decrypt",
]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def cli_env(stack_env, prefect_env) -> dict[str, str]:
    """Environment of a CLI subprocess: the session's Prefect server and the broker, but
    no Girder API key (tests that want it from the environment add it)."""
    env = {k: v for k, v in os.environ.items() if k != "GIRDER_API_KEY"}
    env.update(prefect_env)
    env["KAFKA_BOOTSTRAP_SERVERS"] = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    env["PYTHONIOENCODING"] = "utf-8"
    return env



def produced_files(tmp_path: Path, topic: str, bootstrap: str, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = write_tree(tmp_path / "tree", {
        "racine.txt": f"root file {seed}\n".encode(),
        "données/été/chaîne ü.bin": rng.randbytes(3 * CHUNK_SIZE + 5),
        "données/一.dat": b"\x01",
        "a b/c (1)/x.json": b'{"k": [1, 2, 3]}',
    })
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path), "our produce")
    return files


def all_in_girder(gc, root_path: str, files: dict[str, bytes]):
    """A condition: every file is an item of its full size below ``root_path``."""
    def check() -> bool:
        try:
            root = folder_by_path(gc, root_path)
        except Exception:  # noqa: BLE001 - Girder answers 400 until the folder exists
            return False
        items = girder_tree(gc, root["_id"]).items
        return all(rel in items and items[rel].get("size") == len(data)
                   for rel, data in files.items())
    return check


def run_args(api_url: str, api_key: str | None, topic: str, collection: dict,
             output_dir: Path, *extra: str) -> list[str]:
    return [api_url, *([api_key] if api_key else []), "--topic_name", topic, "--collection_name", collection["name"],
            "--output_dir", str(output_dir), "--update_seconds", "1", *extra]


# ------------------------------------------------------------------------------ options

def test_processor_help_lists_openmsistream_options(cli_env):
    done = subprocess.run([str(OUR_PROCESSOR), "--help"], env=cli_env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    missing = [option for option in SUPPORTED_OPTIONS if option not in text]
    assert not missing, f"--help lacks {missing}:\n{text}"
    assert text.startswith("usage: GirderUploadStreamProcessor"), text
    for choice in ("memory", "disk", "both"):
        assert choice in text, text
    assert "default: test" in text, f"--config should default to 'test':\n{text}"


# --------------------------------------------------------------------------- stopping

@pytest.mark.prefect  # the flow run ends Completed
@pytest.mark.timeout(150)
def test_run_stops_on_q(tmp_path, cli_env, stack_env, make_topic, make_group,
                        make_collection, girder_client, programs):
    topic = make_topic(partitions=4)
    collection = make_collection()
    files = produced_files(tmp_path, topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"], seed=1)
    out = tmp_path / "out"
    program = Program(
        [OUR_CLI, "run", *run_args(stack_env["GIRDER_API_URL"], stack_env["GIRDER_API_KEY"],
                                   topic, collection, out), "--config", "local", "--consumer_group_id",
         make_group(), "--metadata", '{"via": "run"}', "--n_threads", "3"],
        tmp_path / "run.out", cwd=tmp_path, env=cli_env)
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    wait_for(all_in_girder(girder_client, root_path, files), "the files in Girder", program,
             log_file, timeout=RUN_TIMEOUT)
    program.send_line("q")
    code = program.wait(30)
    assert code == 0, program.describe(log_file)
    assert "stopped (stop requested)" in program.output(), program.describe(log_file)
    assert "Finished in state Completed()" in program.output(), program.describe(log_file)
    root = folder_by_path(girder_client, root_path)
    assert_uploaded(girder_client, root["_id"], files, topic, {"via": "run"},
                    root_path=root_path)


def without_prefect_api(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` as a command-line user's who never set up Prefect: no PREFECT_API_URL,
    no profile (an empty PREFECT_HOME)."""
    return {**{k: v for k, v in env.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(tmp_path / "prefect-home")}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("prefect_api", [pytest.param(True, marks=pytest.mark.prefect), False],
                         ids=["prefect-server", "no-prefect-api"])
def test_processor_stops_on_sigterm_with_api_key_from_env(tmp_path, cli_env, stack_env,
                                                          make_topic, make_group,
                                                          make_collection, girder_client,
                                                          programs, prefect_api):
    """The same files, layout, metadata and registries whether the run is a Prefect
    flow run or runs without a Prefect API."""
    if not prefect_api:
        cli_env = without_prefect_api(cli_env, tmp_path)
    topic = make_topic(partitions=4)
    collection = make_collection()
    files = produced_files(tmp_path, topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"], seed=2)
    config = write_omsi_config(tmp_path / "openmsistream.config",
                               stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    out, group = tmp_path / "out", make_group()
    argv = [OUR_PROCESSOR, *run_args(stack_env["GIRDER_API_URL"], None, topic, collection, out),
            "--config", config, "--consumer_group_id", group, "--mode", "both"]
    assert stack_env["GIRDER_API_KEY"] not in map(str, argv)
    program = Program(argv, tmp_path / "processor.out", cwd=tmp_path,
                      env={**cli_env, "GIRDER_API_KEY": stack_env["GIRDER_API_KEY"]})
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    wait_for(all_in_girder(girder_client, root_path, files), "the files in Girder", program,
             log_file, timeout=RUN_TIMEOUT)
    program.proc.send_signal(signal.SIGTERM)
    code = program.wait(30)
    assert code == 0, program.describe(log_file)
    # Our handler ("stop requested") or Prefect's engine (a TerminationSignal the flow
    # catches) stops the loop; either way it shuts down gracefully.
    last = program.output().strip().splitlines()[-1]
    assert last.startswith("stopped (") and ("stop requested" in last or
                                             "TerminationSignal" in last), \
        program.describe(log_file)
    assert "Traceback" not in program.output(), program.describe(log_file)
    way = ("running as a flow run", "Finished in state Completed()") if prefect_api else \
        ("running without Prefect",)
    assert all(text in program.output() for text in way), program.describe(log_file)
    if not prefect_api:  # no line of Prefect's own (a temporary server, a flow run)
        assert all("PREFECT_API_URL" in line for line in program.output().splitlines()
                   if "prefect" in line.lower()), program.describe(log_file)
    root = folder_by_path(girder_client, root_path)
    assert_uploaded(girder_client, root["_id"], files, topic, root_path=root_path)
    # The registries were written at shutdown: one consolidated processed table.
    registry = out / "LOGS" / f"processed_from_{topic}_by_{group}.csv"
    assert registry.is_file(), sorted(p.name for p in (out / "LOGS").iterdir())
    assert sorted(processed_rel_paths(out / "LOGS", topic, group)) == sorted(files), \
        registry.read_text()
    for rel, data in files.items():  # mode 'both' also rebuilt them on disk
        assert (out / rel).read_bytes() == data, rel


@pytest.mark.prefect  # the flow run ends Completed
@pytest.mark.timeout(150)
def test_stops_on_max_idle_with_stdin_closed(tmp_path, cli_env, stack_env, make_topic,
                                             make_group, make_collection, girder_client,
                                             programs):
    """With stdin closed (``/dev/null``: EOF at once, as under a service manager) the
    program neither quits nor fails: it consumes until idle for --max_idle_seconds."""
    topic = make_topic(partitions=4)
    collection = make_collection()
    files = produced_files(tmp_path, topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"], seed=3)
    out, max_idle = tmp_path / "out", 4
    argv = [OUR_CLI, "run",
            *run_args(stack_env["GIRDER_API_URL"], stack_env["GIRDER_API_KEY"], topic,
                      collection, out),
            "--config", "local", "--consumer_group_id", make_group(),
            "--max_idle_seconds", str(max_idle), "--n_threads", "1"]
    started = time.monotonic()
    program = Program(argv, tmp_path / "idle.out", cwd=tmp_path, env=cli_env,
                      stdin=subprocess.DEVNULL)
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    code = program.wait(RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    assert code == 0, program.describe(log_file)
    output = program.output()
    assert f"stopped (no new message for {max_idle}s" in output, program.describe(log_file)
    assert "Finished in state Completed()" in output, program.describe(log_file)
    assert elapsed >= max_idle, f"stopped after {elapsed:.1f}s\n{program.describe(log_file)}"
    n_messages = sum(n_chunks(d) for d in files.values())
    assert f"{n_messages} messages read" in output, program.describe(log_file)
    assert f"{len(files)} files uploaded" in output, program.describe(log_file)
    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_uploaded(girder_client, root["_id"], files, topic, root_path=root_path)
