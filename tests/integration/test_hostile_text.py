"""Attacker-sized and attacker-shaped text through the real CLI (issue 20 §4).

Rejected messages carry keys of 300,000 characters, names holding a newline followed by
a forged log line, and subdirectories of hundreds of thousands of characters. Checked:
the run goes on to its idle stop; every line of the log file is one of the program's
(no forged line, no line over a few thousand characters); the in-progress registry and
its sidecar hold bounded rows; and the bytes written to LOGS per rejected message stay
under a few kilobytes (printed, for the issue's closing note).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgpack
import pytest

from tests.integration.kafka_checks import committed_offsets, end_offsets, produce_raw
from tests.integration.local_files import in_progress_rows
from tests.integration.programs import Program, consumer_argv, consumer_env

pytestmark = pytest.mark.integration

N_EACH = 8
FORGED = "2026-12-05 00:00:00,000 ERROR girder_upload_stream.forged: FORGED LINE"
#: The program's own log lines start with a timestamp and a level.
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def _value(filename: str, subdir: str, chunk_hash: bytes | None = None) -> bytes:
    data = b"payload"
    return msgpack.packb([filename, _sha512(data), chunk_hash or _sha512(data), 0, 1, 1,
                          subdir, "", data, 0.0], use_bin_type=True)


def hostile_messages() -> list[tuple[bytes, bytes, int]]:
    """Rejected messages only: huge keys on undecodable values, forged-line names with a
    bad chunk hash, huge subdirectories with an unsafe component."""
    messages = []
    for i in range(N_EACH):
        messages.append(((f"k{i}\n{FORGED}" + "K" * 300_000).encode(), b"\xc1 not msgpack", 0))
        messages.append((f"n{i}".encode(), _value(f"evil{i}.txt\n{FORGED}", "",
                                                  chunk_hash=b"\0" * 64), 0))
        messages.append((f"s{i}".encode(), _value("f.txt", "a/" * 150_000 + f"../x{i}"), 0))
    return messages


def test_hostile_text_is_bounded_in_logs(stack_env, make_topic, make_group,
                                         make_collection, tmp_path: Path) -> None:
    topic, group = make_topic(partitions=1), make_group()
    collection = make_collection()
    messages = hostile_messages()
    produce_raw(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic, messages)
    out = tmp_path / "out"
    env = consumer_env(stack_env, {})
    env.pop("PREFECT_API_URL", None)  # the plain run: its log file is the one measured
    program = Program(consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                                    out, group, max_idle=4), tmp_path / "run.log", tmp_path,
                      env=env)
    assert program.wait(180) == 0, program.describe()
    logs = out / "LOGS"
    written = sum(p.stat().st_size for p in logs.rglob("*") if p.is_file())
    per_message = written / len(messages)
    print(f"\nLOGS bytes: {written} for {len(messages)} rejected messages: "
          f"{per_message:.0f} bytes per message")
    log_lines = (logs / "GirderUploadStreamProcessor.log").read_text().splitlines()
    console = program.output()
    assert any("\\n" + FORGED in line for line in log_lines)  # shown, escaped
    for line in log_lines:
        assert LINE.match(line) or line.startswith(("Traceback", "  ", " ")) or not line, line
        assert len(line) < 5000, len(line)
        assert not line.startswith(FORGED), line
    assert not any(l.startswith(FORGED) for l in console.splitlines()), console[-3000:]
    rows = in_progress_rows(logs, topic, group)
    assert len(rows) == len(messages), [r.rel_filepath for r in rows]
    for row in rows:
        assert len(str(row.rel_filepath)) < 600 and "\n" not in str(row.rel_filepath)
        assert len(str(row.extra.get("reason"))) < 1100
    assert per_message < 4000, per_message
    ends = end_offsets(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic)
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": stack_env["KAFKA_BOOTSTRAP_SERVERS"]})
    assert committed_offsets(admin, group, topic) == ends


URL_PASSWORD = "Sup3r-S3cret-Pw"


def test_a_password_in_the_girder_url_is_masked_on_console_and_in_the_log_file(
        stack_env, make_topic, make_group, make_collection, tmp_path: Path) -> None:
    """The Girder API URL with user information (and an HTTP proxy variable with one that
    is not used for this host): the run works, and no line shows either password."""
    topic, group = make_topic(partitions=1), make_group()
    api_url = stack_env["GIRDER_API_URL"].replace("http://", f"http://gus:{URL_PASSWORD}@")
    out = tmp_path / "out"
    env = consumer_env(stack_env, {})
    env.pop("PREFECT_API_URL", None)
    env.update(HTTP_PROXY=f"http://proxyuser:{URL_PASSWORD}x@proxy.invalid:3128",
               NO_PROXY="127.0.0.1,localhost")
    program = Program(consumer_argv(api_url, topic, make_collection()["name"], out, group,
                                    "local", 2, "--logger_stream_level", "debug"),
                      tmp_path / "run.log", tmp_path, env=env)
    assert program.wait(120) == 0, program.describe()
    console = program.output()
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log").read_text()
    assert "gus:***@127.0.0.1" in console + log_file, console[-3000:]
    for text in (console, log_file):
        assert URL_PASSWORD not in text, text[-3000:]
