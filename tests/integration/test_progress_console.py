"""The progress line of a CLI run (issue 15, item 5), against the real stack: it is
written to standard error, says what was done, and standard output keeps only what it
had (the "." lines, the counts and the final summary), so that scripts reading it see
no change. That OpenMSIStream 1.8.8's own lines are still printed word for word with
the progress line on is checked beside the real program in
``test_console_and_log_topic.py``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.local_files import write_tree
from tests.integration.programs import (OUR_CLI, consumer_env, finish, produce_ours,
                                        stop_line)

pytestmark = pytest.mark.integration

FILES = {f"run-{i // 3}/frame-{i}.raw": bytes([i]) * (150_000 + i) for i in range(6)}
PROGRESS = re.compile(r"^progress: \d+:\d\d:\d\d up; (?P<files>[\d,]+) files? done "
                      r"\((?P<size>[\d.]+ (B|KiB|MiB))\), (?P<failed>[\d,]+) failed, "
                      r"(?P<in_progress>[\d,]+) in progress; (lag [\d,]+ messages?|lag unknown); "
                      r"(rate not known yet|[\d.]+ files/s, [\d.]+ (B|KiB|MiB)/s over the "
                      r"last \d+ s)(; (?P<hops>hop .*))?$", re.MULTILINE)
#: This member's partitions on the topic's one hop, each one's lag (``?``: unknown yet).
HOP = re.compile(r"^hop source: group (?P<group>\S+), (no partitions|partitions "
                 r"(?P<partitions>[\d,-]+) lag (?P<lag>[\d,?]+(/[\d,?]+)*))$")
#: OpenMSIStream's start and shutdown lines, logged on standard error (their comparison
#: with the real program's is test_console_and_log_topic.py's).
OMSI_LINES = ("Log files and output will be in ", "Will process files from messages in the ",
              "Girder upload stream processor writing to ",
              "total messages were consumed")


@pytest.mark.timeout(240)
def test_cli_run_prints_progress_on_stderr_only(tmp_path: Path, stack_env, prefect_env,
                                                make_topic, make_group,
                                                make_collection) -> None:
    topic, collection, group = make_topic(2), make_collection(), make_group()
    write_tree(tmp_path / "lab", FILES)
    finish(produce_ours(tmp_path / "lab", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                        tmp_path), "producing")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        result = subprocess.run(
            [str(OUR_CLI), "run", stack_env["GIRDER_API_URL"], "--config", "local",
             "--topic_name", topic, "--collection_name", collection["name"],
             "--output_dir", str(tmp_path / "out"), "--consumer_group_id", group,
             "--max_idle_seconds", "6", "--update_seconds", "1", "--progress_seconds", "1"],
            cwd=tmp_path, env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL,
            stdout=out, stderr=err, timeout=200)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    shown = f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}"
    assert result.returncode == 0, shown

    lines = list(PROGRESS.finditer(stderr))
    assert len(lines) >= 3, shown  # one a second for several seconds, and the last one
    last = lines[-1]
    print(f"[progress] {len(lines)} progress lines; the last: {last.group(0)}")
    assert int(last["files"].replace(",", "")) == len(FILES), shown
    assert last["failed"] == "0" and last["in_progress"] == "0", shown
    assert not last.group(0).endswith("rate not known yet"), shown
    # The member's partitions and their lag (issue 23 §4): the one member holds both
    # partitions, and is caught up on each at the end.
    hops = [HOP.match(m["hops"] or "") for m in lines]
    assert all(h and h["group"] == group for h in hops), shown
    assert hops[-1]["partitions"] == "0,1" and hops[-1]["lag"] == "0/0", shown
    for line in stderr.splitlines():
        if "progress:" in line:  # whole lines, never glued to a log line
            assert PROGRESS.match(line), f"a torn progress line: {line!r}\n{shown}"
    for text in OMSI_LINES:
        assert text in stderr, f"OpenMSIStream's line {text!r} is missing\n{shown}"

    # Standard output is what it was: "." lines, the counts and the summary; no progress.
    assert "progress:" not in stdout, shown
    assert stdout.splitlines().count(".") >= 2, shown
    assert stop_line(stdout)["uploaded"] == len(FILES), shown
    assert re.search(r"^\d+ messages read \([\d,]+ bytes\), 6 files uploaded", stdout,
                     re.MULTILINE), shown
