"""OpenMSIStream's console lines and its log topic (issue 16), side by side with the real
program: OpenMSIStream 1.8.8's ``GirderUploadStreamProcessor`` (from
``.venv-openmsistream``) and ours consume the same topic at the same time, each in its
own consumer group, collection and output folder, both with a heartbeat topic and a log
topic. Each is sent ``c`` once its files are in Girder, then ``q``.

Checked: every line of OpenMSIStream's that scripts read (start, ``check``, shutdown)
is printed by ours with the same words (output folders aside), our progress line
(``--progress_seconds``) on; both programs' log
messages have the same key form and JSON shape; ours carry our start and shutdown
lines, and never the Girder API key.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.integration.girder_checks import girder_listing
from tests.integration.kafka_checks import topic_messages
from tests.integration.local_files import write_tree
from tests.integration.programs import (OMSI_BIN, OUR_CLI, Program, consumer_env, finish, produce_ours, wait_for, write_omsi_config)

pytestmark = pytest.mark.integration

FILES = {"notes.txt": b"calibration notes\n", "run-1/frame.raw": bytes(range(256)) * 600}
OMSI_LINE = re.compile(r"^\[GirderUploadStreamProcessor [\d-]+ [\d:]+\] (?P<text>.*)$",
                       re.MULTILINE)
OUR_LINE = re.compile(r"^\S+ \S+ INFO girder_upload_stream\.console: (?P<text>.*)$",
                      re.MULTILINE)
#: The lines of OpenMSIStream's that we print too (its other lines are not claimed).
CLAIMED = [re.compile(p) for p in (
    r"Heartbeat messages will be produced to the '.*' topic every .* seconds$",
    r"log messages will be produced to the '.*' topic every .* seconds$",
    r"Log files and output will be in ",
    r"Listening to the .* topic for files to upload to Girder using the API at ",
    r"Will process files from messages in the .* topic using \d+ threads?$",
    r"\d+ messages read, \d+ messages processed, \d+ files completely processed so far$",
    r"Girder upload stream processor writing to .* shut down$",
    r"\d+ total messages were consumed, \d+ messages were successfully processed, and "
    r"\d+ files were uploaded to Girder$")]


CHECK = CLAIMED[5]  # the line "c" prints


def _lines(pattern: re.Pattern[str], output: str, out_dir: Path) -> list[str]:
    """The claimed lines, in order; of the check lines only the last (the one that
    counted every file: see :func:`_check_until_all_processed`)."""
    lines = [m["text"].replace(str(out_dir.resolve()), "<out>")
             for m in pattern.finditer(output)
             if any(c.match(m["text"]) for c in CLAIMED)]
    last = max((i for i, line in enumerate(lines) if CHECK.match(line)), default=None)
    return [line for i, line in enumerate(lines) if not CHECK.match(line) or i == last]


def _check_until_all_processed(program: Program) -> None:
    """Type ``c`` (at most once a second) until the check line counts every file: a file
    is in Girder a moment before OpenMSIStream counts it as processed, so one ``c`` right
    after the items appear may print a count one short."""
    typed = [float("-inf")]

    def all_processed() -> bool:
        if f"{len(FILES)} files completely processed so far" in program.output():
            return True
        if time.monotonic() - typed[0] >= 1.0:
            program.send_line("c")
            typed[0] = time.monotonic()
        return False
    wait_for(all_processed, "a check line counting every file", program)


def _items_in(gc, collection: dict) -> int:
    return len(girder_listing(gc, collection["_id"], "collection").items)


def test_console_lines_and_log_messages_match_openmsistream(
        tmp_path: Path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs) -> None:
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    api_key = stack_env["GIRDER_API_KEY"]
    topic, heartbeats, logs = make_topic(2), make_topic(1), make_topic(1)
    write_tree(tmp_path / "lab", FILES)
    finish(produce_ours(tmp_path / "lab", topic, bootstrap, tmp_path), "producing")
    config = write_omsi_config(tmp_path / "lab.config", bootstrap)
    theirs_c, ours_c = make_collection(), make_collection()
    common = ["--config", str(config), "--topic_name", topic, "--update_seconds", "5",
              "--heartbeat_topic_name", heartbeats, "--heartbeat_interval_secs", "8",
              "--log_topic_name", logs, "--log_interval_secs", "3"]
    theirs_out, ours_out = tmp_path / "theirs", tmp_path / "ours"
    theirs = Program([OMSI_BIN / "GirderUploadStreamProcessor", api_url, api_key, *common,
                      "--collection_name", theirs_c["name"], "--output_dir", theirs_out,
                      "--consumer_group_id", make_group(), "--heartbeat_program_id", "omsi",
                      "--log_program_id", "omsi"], tmp_path / "theirs.log", cwd=tmp_path)
    programs.append(theirs)
    ours = Program([OUR_CLI, "run", api_url, *common, "--collection_name", ours_c["name"],
                    "--output_dir", ours_out, "--consumer_group_id", make_group(),
                    "--heartbeat_program_id", "ours", "--log_program_id", "ours",
                    "--progress_seconds", "2"],  # our progress line on: nothing else changes
                   tmp_path / "ours.log", cwd=tmp_path, env=consumer_env(stack_env, prefect_env))
    programs.append(ours)
    for program, collection in ((theirs, theirs_c), (ours, ours_c)):
        wait_for(lambda c=collection: _items_in(girder_client, c) == len(FILES),
                 "both files in Girder", program, timeout=120)
    for program in (theirs, ours):
        _check_until_all_processed(program)
        assert program.stop(timeout=60) == 0, program.describe()

    expected = _lines(OMSI_LINE, theirs.output(), theirs_out)
    got = _lines(OUR_LINE, ours.output(), ours_out)
    assert len(expected) == len(CLAIMED), f"OpenMSIStream printed:\n{theirs.output()}"
    assert got == expected, f"ours printed:\n{ours.output()}"
    assert re.search(r"^progress: .* files? done ", ours.output(), re.MULTILINE), ours.output()
    assert "progress: " not in theirs.output()
    assert api_key not in ours.output()

    messages = topic_messages(bootstrap, logs, make_group(), n_expected=4)
    by_key: dict[str, list[dict]] = {}
    for msg in sorted(messages, key=lambda m: m.timestamp()[1]):
        by_key.setdefault(msg.key().decode(), []).append(json.loads(msg.value()))
    assert set(by_key) == {"omsi_log", "ours_log"}
    for values in by_key.values():
        for value in values:
            assert set(value) == {"timestamp", "messages"}
            assert isinstance(value["timestamp"], float)
            assert all(isinstance(line, str) for line in value["messages"])
    mine = by_key["ours_log"]
    assert len(mine) >= 2
    assert f"Listening to the {topic} topic for files to upload to Girder using the API at " \
           f"{api_url}" in mine[0]["messages"]
    assert any(line.endswith("files were uploaded to Girder") for line in mine[-1]["messages"])
    assert all(api_key not in line for value in mine for line in value["messages"])
    assert abs(mine[-1]["timestamp"] - by_key["omsi_log"][-1]["timestamp"]) < 120
