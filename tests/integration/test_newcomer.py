"""A newcomer's mistakes at start-up: each one is one clear line and a documented exit
status, on the real stack, with real processes (issue 24).

* a Prefect API that is not there (``PREFECT_API_URL`` still exported): one line naming
  the URL and what to do, exit 2, nothing consumed or committed;
* Kafka unreachable, for ``run`` and ``produce``: one line, exit 2, no librdkafka lines;
  Ctrl-C during the wait ends it within two seconds with exit 130;
* producing to a topic that does not exist: one line, at once;
* a Girder URL without ``/v1``: one line that says so, no HTML.

The unreachable services are unused local ports: the shared stack is never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.kafka_checks import committed_offsets
from tests.integration.programs import OUR_CLI, REPO_ROOT, finish, produce_ours

pytestmark = pytest.mark.integration

#: The start-up wait for a Kafka broker (kafka/clients.py, kafka/chunk_producer.py).
KAFKA_WAIT = 30.0


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Console:
    """One command run as from a terminal: SIGINT as Ctrl-C sends it (the default
    handler restored, even when the test runner's shell ignores it), the console output
    (stdout and stderr, in order), the exit status and the time taken."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(a) for a in argv], cwd=cwd, env={**env, "PYTHONIOENCODING": "utf-8"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.code: int | None = None
        self.lines: list[str] = []
        self.seconds = 0.0

    def finish(self, timeout: float) -> Console:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"still running after {timeout:.0f}s:\n{out[-4000:]}")
        self.code, self.lines = self.proc.returncode, out.splitlines()
        self.seconds = time.monotonic() - self.started
        return self

    def interrupt_after(self, seconds: float, timeout: float) -> float:
        """Send SIGINT after ``seconds`` (the program still waiting); the seconds it then
        took to exit."""
        time.sleep(seconds)  # the wait being interrupted is the program's, not the test's
        assert self.proc.poll() is None, "the program ended before Ctrl-C"
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        self.finish(timeout)
        return time.monotonic() - sent

    def __str__(self) -> str:
        return f"exit {self.code} after {self.seconds:.1f}s:\n" + "\n".join(self.lines[-40:])


@pytest.fixture
def base_env(stack_env: dict[str, str]) -> dict[str, str]:
    """The stack's Kafka and Girder, no Prefect API, the key in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS=stack_env["KAFKA_BOOTSTRAP_SERVERS"],
               GIRDER_API_KEY=stack_env["GIRDER_API_KEY"])
    return env


def run_argv(api_url: str, topic: str, out: Path, group: str = "create_new") -> list[str]:
    return [OUR_CLI, "run", api_url, "--topic_name", topic, "--output_dir", out,
            "--consumer_group_id", group, "--max_idle_seconds", "5"]


def produce_argv(path: Path, topic: str) -> list[str]:
    return [OUR_CLI, "produce", path, "--config", "local", "--topic_name", topic]


def test_a_prefect_api_that_is_not_there_is_one_line_and_exit_2(
        base_env, stack_env, make_topic, make_group, kafka_admin, tmp_path: Path) -> None:
    topic, group = make_topic(1), make_group()
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    finish(produce_ours(tmp_path / "a.txt", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                        tmp_path), "produce")
    url = f"http://127.0.0.1:{free_port()}/api"
    run = Console(run_argv(stack_env["GIRDER_API_URL"], topic, tmp_path / "out", group),
                  {**base_env, "PREFECT_API_URL": url}, tmp_path).finish(60)
    assert run.code == 2, run
    assert run.lines == [f"error: cannot start: no Prefect API answers at {url} ([Errno 111] "
                         "Connection refused); start the Prefect server (make prefect-up), "
                         "or unset PREFECT_API_URL to run without Prefect"], run
    assert all(offset < 0 for offset in committed_offsets(kafka_admin, group, topic).values())


def test_kafka_unreachable_is_one_line_and_exit_2_for_run_and_produce(
        base_env, stack_env, tmp_path: Path) -> None:
    servers = f"127.0.0.1:{free_port()}"
    env = {**base_env, "KAFKA_BOOTSTRAP_SERVERS": servers}
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    # Side by side: each waits KAFKA_WAIT seconds for a broker before it gives up.
    run = Console(run_argv(stack_env["GIRDER_API_URL"], "t-newcomer", tmp_path / "out"), env,
                  tmp_path)
    produce = Console(produce_argv(tmp_path / "a.txt", "t-newcomer"), env, tmp_path)
    expected = (f"error: no Kafka broker answered at {servers} in {KAFKA_WAIT:g} s: is Kafka "
                "running, and are bootstrap.servers in the config file right? "
                "[topic='t-newcomer']")
    for console in (run.finish(KAFKA_WAIT + 60), produce.finish(KAFKA_WAIT + 60)):
        assert console.code == 2, console
        assert console.lines == [expected], console
        assert console.seconds < KAFKA_WAIT + 20, console


@pytest.mark.parametrize("command", ["run", "produce"])
def test_ctrl_c_while_kafka_is_unreachable_exits_130_at_once(
        base_env, stack_env, tmp_path: Path, command: str) -> None:
    env = {**base_env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    argv = (run_argv(stack_env["GIRDER_API_URL"], "t-newcomer", tmp_path / "out")
            if command == "run" else produce_argv(tmp_path / "a.txt", "t-newcomer"))
    console = Console(argv, env, tmp_path)
    took = console.interrupt_after(4.0, timeout=30)
    assert console.code == 130, console
    assert took < 2.0, console
    assert console.lines == ["interrupted"], console


def test_producing_to_a_topic_that_does_not_exist_fails_fast_with_one_line(
        base_env, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    topic = f"t-missing-{os.getpid()}-{time.monotonic_ns()}"
    console = Console(produce_argv(tmp_path / "a.txt", topic), base_env, tmp_path).finish(60)
    assert console.code == 2, console
    assert console.lines == [f"error: cannot produce: Broker: Unknown topic or partition "
                             f"(create the topic first, e.g. with "
                             f"docs/examples/create_topic.py) [topic='{topic}']"], console
    assert console.seconds < 15, console


@pytest.mark.parametrize("cut", ["/v1", "/api/v1"])
def test_a_girder_url_that_is_not_the_rest_api_says_so_in_one_line(
        base_env, stack_env, make_topic, tmp_path: Path, cut: str) -> None:
    url = stack_env["GIRDER_API_URL"].removesuffix(cut)
    console = Console(run_argv(url, make_topic(1), tmp_path / "out"), base_env,
                      tmp_path).finish(60)
    assert console.code == 2, console
    assert len(console.lines) == 1 and "<" not in console.lines[0], console
    assert console.lines[0].startswith(f"error: cannot start: Girder at {url}: log in: HTTP "), \
        console
    assert console.lines[0].endswith("an HTML page, not an answer of Girder's REST API: is "
                                     "the URL the REST API's, ending in /api/v1?"), console


# ----------------------------------------------------------- nothing fails silently

def consume_argv(stack_env: dict[str, str], topic: str, collection: str, out: Path,
                 *extra: str) -> list[str]:
    return [*run_argv(stack_env["GIRDER_API_URL"], topic, out), "--collection_name",
            collection, *extra]


def test_missing_side_topics_are_logged_once_and_disk_mode_leaves_no_staging_folder(
        base_env, stack_env, make_topic, make_collection, tmp_path: Path) -> None:
    topic, collection = make_topic(1), make_collection()["name"]
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_bytes(b"hello\n")
    finish(produce_ours(tmp_path / "tree", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                        tmp_path), "produce")
    beats, logs = f"{topic}-no-beats", f"{topic}-no-logs"
    out = tmp_path / "out"
    run = Console(consume_argv(stack_env, topic, collection, out, "--mode", "disk",
                               "--heartbeat_topic_name", beats, "--heartbeat_interval_secs",
                               "1", "--log_topic_name", logs, "--log_interval_secs", "1"),
                  base_env, tmp_path).finish(120)
    assert run.code == 0, run
    assert any(", 1 files uploaded," in line for line in run.lines), run
    for what, name in (("heartbeat", beats), ("log", logs)):
        said = [line for line in run.lines if f"{what} topic '{name}' cannot be used" in line]
        assert len(said) == 1, run
        assert f"no {what} message is sent in this run" in said[0], run
    assert not [line for line in run.lines if line.startswith("%")], run  # no raw librdkafka
    assert sorted(p.name for p in out.iterdir()) == ["LOGS"], run


def test_a_download_regex_that_matches_nothing_is_counted_in_the_summary_and_progress(
        base_env, stack_env, make_topic, make_collection, tmp_path: Path) -> None:
    topic, collection = make_topic(2), make_collection()["name"]
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "a.txt").write_bytes(b"a" * 3000)
    (tmp_path / "tree" / "sub" / "b.txt").write_bytes(b"b")
    finish(produce_ours(tmp_path / "tree", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                        tmp_path, chunk_size=1024), "produce")
    # re.match: "b.txt" is not matched by a pattern that matches "sub/b.txt" only later.
    run = Console(consume_argv(stack_env, topic, collection, tmp_path / "out",
                               "--download_regex", r"b\.txt", "--progress_seconds", "1"),
                  base_env, tmp_path).finish(120)
    assert run.code == 0, run
    [summary] = [line for line in run.lines if line.startswith("stopped (")]
    assert ", 0 files uploaded," in summary and \
        summary.endswith(", 2 skipped by --download_regex"), run
    progress = [line for line in run.lines if line.startswith("progress: ")]
    assert progress and ", 2 skipped by --download_regex; " in progress[-1], run


def test_create_topic_says_in_one_line_that_a_topic_exists_already(
        base_env, make_topic, tmp_path: Path) -> None:
    topic = make_topic(2)
    console = Console([sys.executable, REPO_ROOT / "docs" / "examples" / "create_topic.py",
                       topic], base_env, tmp_path).finish(60)
    assert console.code == 0, console
    assert console.lines == [f"topic {topic!r} exists already: left as it is"], console
