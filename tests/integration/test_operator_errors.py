"""Operator errors through the real CLI (issue 20 §6): a second consumer on one output
folder, a consumer killed with SIGKILL, a registry file saved by a spreadsheet. Each is
a clean stop with one line and exit status 2, or a survived fault; never a traceback."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from girder_upload_stream.registry.tables import processed_path
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.integration.kafka_checks import committed_offsets, produce_raw
from tests.integration.programs import Program, consumer_argv, consumer_env, wait_for

pytestmark = pytest.mark.integration


def _env(stack_env) -> dict[str, str]:
    env = consumer_env(stack_env, {})
    env.pop("PREFECT_API_URL", None)
    return env


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap})


def _run_once(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _one_file_topic(bootstrap: str, make_topic, make_group, make_collection):
    """A fresh topic holding one small file, with a fresh group and collection."""
    topic, group, collection = make_topic(partitions=1), make_group(), make_collection()
    produce_raw(bootstrap, topic, [(k.encode(), v, 0) for k, v in map(
        encode_chunk, chunk_file(b"one file", filename="one.txt", chunk_size=100))])
    return topic, group, collection


def test_a_second_consumer_on_one_output_folder_is_refused_and_a_sigkill_frees_it(
        stack_env, make_topic, make_group, make_collection, tmp_path: Path) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = _one_file_topic(bootstrap, make_topic, make_group,
                                               make_collection)
    out = tmp_path / "out"
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         "local", 600)
    first = Program(argv, tmp_path / "first.log", tmp_path, env=_env(stack_env))
    try:
        wait_for(lambda: committed_offsets(_admin(bootstrap), group, topic).get(0) == 1,
                 "the first consumer's commit", first)
        second = _run_once(argv, _env(stack_env), tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"error: another consumer is running on the output folder {out}" \
            in second.stderr and f"pid {first.proc.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        first.assert_alive()
        assert "revoked" not in first.output().lower()  # the second never joined
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.stop()
    third = _run_once(consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                                    out, group, "local", 2), _env(stack_env), tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr  # no stale lock


@pytest.mark.parametrize("separator", [",", "\t"])
def test_a_registry_saved_by_a_spreadsheet_stops_the_start_cleanly(
        stack_env, make_topic, make_group, make_collection, tmp_path: Path,
        separator: str) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = _one_file_topic(bootstrap, make_topic, make_group,
                                               make_collection)
    out = tmp_path / "out"
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         "local", 2)
    assert _run_once(argv, _env(stack_env), tmp_path).returncode == 0
    registry = processed_path(out / "LOGS", topic, group)
    text = registry.read_text().replace(";", separator)
    registry.write_text(text)
    result = _run_once(argv, _env(stack_env), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: cannot start: the registry file {registry} cannot be read" \
        in result.stderr and f"separated by {separator!r}" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert registry.read_text() == text  # nothing changed
