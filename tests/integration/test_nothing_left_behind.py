"""Nothing of ours outlives the consumer (issue 14, item 3).

Each command (``girder-upload-stream run`` and the drop-in ``GirderUploadStreamProcessor``)
is started on a fresh topic, waits until it put a file in Girder, and is then killed
with SIGKILL (no handler, no atexit) or stopped as a user would (``q``). A few seconds
later no process descended from it may be alive: neither one of the descendants seen
just before the kill (matched by PID and start time, so a reused PID does not count),
nor any process whose command line or environment names the run's unique topic or
temporary folder. Without ``PREFECT_API_URL`` (a command-line user's default) the old
commands left Prefect's temporary API server running for ever here; with a Prefect
server configured nothing must be left either.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.programs import (OUR_CLI, OUR_PROCESSOR, Program, finish, produce_ours,
                                        wait_for, write_omsi_config)

pytestmark = pytest.mark.integration

SETTLE_SECONDS = 5.0


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str) -> bool:
    """The same process (PID and start time) still exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and _start_time(pid) == started


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` now: {pid: start time}."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                started = _start_time(child)
                if started is not None and child not in found:
                    found[child] = started
                    todo.append(child)
    return found


def naming(marks: list[str], exclude: set[int]) -> dict[int, str]:
    """Processes (but those in ``exclude``) whose command line or environment holds one
    of ``marks``: {pid: command line}."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        texts = []
        for name in ("cmdline", "environ"):
            try:
                texts.append(Path(f"/proc/{entry}/{name}").read_bytes())
            except OSError:
                continue
        if any(mark.encode() in text for mark in marks for text in texts):
            state = _start_time(int(entry))
            if state is not None:
                cmdline = texts[0].replace(b"\0", b" ").decode(errors="replace") if texts else ""
                found[int(entry)] = cmdline[:300]
    return found


def _env(stack_env: dict[str, str], tmp_path: Path, prefect_api_url: str | None) -> dict:
    """A command-line user's environment: the broker and the key, and a Prefect API only
    when given (no profile either: an empty PREFECT_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS=stack_env["KAFKA_BOOTSTRAP_SERVERS"],
               GIRDER_API_KEY=stack_env["GIRDER_API_KEY"], PYTHONIOENCODING="utf-8",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    if prefect_api_url:
        env.update(PREFECT_API_URL=prefect_api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _argv(command: str, api_url: str, topic: str, collection: str, out: Path,
          config: Path) -> list:
    common = ["--topic_name", topic, "--collection_name", collection, "--output_dir", out,
              "--update_seconds", "5"]
    if command == "run":
        return [OUR_CLI, "run", api_url, "--config", config, *common]
    return [OUR_PROCESSOR, api_url, "--config", config, *common]


def _consuming(tmp_path, stack_env, make_topic, make_collection, programs, command,
               prefect_api_url):
    """Start ``command`` on a fresh topic holding one file; return it once the file is
    in Girder, with the marks (topic, folder) that name this run."""
    topic = make_topic(partitions=2)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "one.txt").write_bytes(b"a file to wait for\n")
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    finish(produce_ours(tree, topic, bootstrap, tmp_path), "our produce")
    config = write_omsi_config(tmp_path / "consumer.config", bootstrap)
    program = Program(_argv(command, stack_env["GIRDER_API_URL"], topic,
                            make_collection()["name"], tmp_path / "out", config),
                      tmp_path / "consumer.out", cwd=tmp_path,
                      env=_env(stack_env, tmp_path, prefect_api_url))
    programs.append(program)
    wait_for(lambda: "first file in Girder" in program.output(), "the first file in Girder",
             program, timeout=180)
    return program, [topic, str(tmp_path)]


def _assert_nothing_left(program: Program, seen: dict[int, str], marks: list[str]) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        left = {pid: started for pid, started in seen.items() if _alive(pid, started)}
        named = naming(marks, exclude={os.getpid(), *_ancestors()})
        if not left and not named:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in left:  # clean up what the test found, by PID, before failing
        os.kill(pid, signal.SIGKILL)
    for pid in named:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f"still alive {SETTLE_SECONDS:g}s after the consumer ended: descendants "
                f"{sorted(left)}, naming this run {named}\n{program.describe()}")


def _ancestors() -> set[int]:
    """This test process's parents (pytest's launcher may name the temporary folder)."""
    found, pid = set(), os.getppid()
    while pid > 1:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["run", "processor"])
@pytest.mark.parametrize("with_server", [False, True], ids=["no-prefect-api", "prefect-server"])
def test_nothing_outlives_a_sigkill(tmp_path, stack_env, make_topic, make_collection,
                                    programs, request, command, with_server):
    api = request.getfixturevalue("prefect_api_url") if with_server else None
    program, marks = _consuming(tmp_path, stack_env, make_topic, make_collection, programs,
                                command, api)
    seen = descendants(program.proc.pid)
    program.proc.send_signal(signal.SIGKILL)
    program.proc.wait(30)
    program.stop()
    _assert_nothing_left(program, seen, marks)
    expected = "running as a flow run" if with_server else "running without Prefect"
    assert expected in program.output(), program.describe()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command, with_server", [("run", False), ("processor", True)])
def test_nothing_outlives_a_normal_stop(tmp_path, stack_env, make_topic, make_collection,
                                        programs, request, command, with_server):
    api = request.getfixturevalue("prefect_api_url") if with_server else None
    program, marks = _consuming(tmp_path, stack_env, make_topic, make_collection, programs,
                                command, api)
    seen = descendants(program.proc.pid)
    assert program.stop(timeout=60) == 0, program.describe()
    assert "stopped (stop requested)" in program.output(), program.describe()
    _assert_nothing_left(program, seen, marks)
