"""Running our programs and OpenMSIStream's, and the local stack's components."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.local_files import CHUNK_SIZE

__all__ = ["REPO_ROOT", "RETRY_LINE", "OMSI_BIN", "OUR_BIN", "OUR_CLI", "OUR_PROCESSOR", "TIMEOUT",
           "write_omsi_config", "Program", "wait_for", "produce_ours", "produce_omsi_file",
           "finish", "FAULT_CONSUMER_CONFIG", "STOP_LINE", "write_fault_config", "consumer_env",
           "consumer_argv", "stop_line", "stackctl", "girder_serves", "kafka_serves"]


#: A retried upload in a run's output: the consumer's retry of a file (retry_policy.py;
#: "retrying in"), or the older forms (Prefect's task retry, the plain executor's).
RETRY_LINE = re.compile(r"Retry \d+/\d+ will start|retry \d+/\d+ in \d|retrying in \d+s")


REPO_ROOT = Path(__file__).resolve().parents[2]


OMSI_BIN = Path(os.environ.get("GUS_OPENMSISTREAM_VENV",
                               REPO_ROOT / ".venv-openmsistream")) / "bin"


OUR_BIN = REPO_ROOT / ".venv" / "bin"


OUR_CLI = OUR_BIN / "girder-upload-stream"


OUR_PROCESSOR = OUR_BIN / "GirderUploadStreamProcessor"


TIMEOUT = 60.0


def write_omsi_config(path: Path, bootstrap: str, broker_extra: str = "",
                      sections: str = "") -> Path:
    """A config file for OpenMSIStream's own programs (and usable by ours);
    ``broker_extra`` lines go into ``[broker]``, ``sections`` are appended."""
    path.write_text(
        "[broker]\n"
        f"bootstrap.servers = {bootstrap}\n"
        f"{broker_extra}"
        "\n[producer]\n"
        "key.serializer   = StringSerializer\n"
        "value.serializer = DataFileChunkSerializer\n"
        "\n[consumer]\n"
        "group.id           = create_new\n"
        "auto.offset.reset  = earliest\n"
        "enable.auto.commit = False\n"
        "key.deserializer   = StringDeserializer\n"
        "value.deserializer = DataFileChunkDeserializer\n"
        f"{sections}")
    return path


class Program:
    """A console program run in the background, its output in a file; stopped by its PID
    (``q`` on stdin first, then SIGTERM, then SIGKILL). ``env`` replaces the environment."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path,
                 env: dict[str, str] | None = None, stdin=subprocess.PIPE) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()/wait()
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, stdin=stdin, stdout=self._log, stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONIOENCODING": "utf-8"})

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def describe(self, extra_files: tuple[Path, ...] = ()) -> str:
        text = (f"$ {' '.join(self.argv)}\n(pid {self.proc.pid}, returncode "
                f"{self.proc.poll()})\n--- output ---\n{self.output()[-12000:]}")
        for path in extra_files:
            if path.is_file():
                text += f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-6000:]}"
        return text

    def assert_alive(self, extra_files: tuple[Path, ...] = ()) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{Path(self.argv[0]).name} exited early\n{self.describe(extra_files)}")

    def send_line(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        """Wait for the program to exit on its own; fail (after killing it) if it does not."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(timeout=5)
            pytest.fail(f"{Path(self.argv[0]).name} did not exit within {timeout:.0f}s\n"
                        f"{self.describe()}")
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """Ask the program to quit as a user would, and return its exit code."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.send_line("q")
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._close()
        return self.proc.returncode


def wait_for(condition: Callable[[], bool], what: str, program: Program | None = None,
             extra_files: tuple[Path, ...] = (), timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if program is not None:
            program.assert_alive(extra_files)
        time.sleep(0.3)
    detail = program.describe(extra_files) if program is not None else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")


def produce_ours(path: Path, topic: str, bootstrap: str, cwd: Path,
                 chunk_size: int = CHUNK_SIZE) -> subprocess.Popen:
    """Start ``girder-upload-stream produce PATH``; finish it with :func:`finish`."""
    return subprocess.Popen(
        [str(OUR_CLI), "produce", str(path), "--config", "local", "--topic_name", topic,
         "--chunk_size", str(chunk_size), "--quiet"],
        cwd=cwd, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def produce_omsi_file(path: Path, topic: str, config: Path, cwd: Path,
                      chunk_size: int = CHUNK_SIZE) -> subprocess.Popen:
    """Start OpenMSIStream's ``UploadDataFile`` (the file lands at the root)."""
    return subprocess.Popen(
        [str(OMSI_BIN / "UploadDataFile"), str(path), "--config", str(config),
         "--topic_name", topic, "--chunk_size", str(chunk_size)],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text}"
    return text


FAULT_CONSUMER_CONFIG = (
    "# The local stack, with a shorter consumer session than the program's 10 s: a\n"
    "# consumer killed with SIGKILL never leaves its group, and its partitions are only\n"
    "# handed to the restarted program once its session expires.\n"
    "[broker]\n"
    "bootstrap.servers = $KAFKA_BOOTSTRAP_SERVERS\n"
    "\n[consumer]\n"
    "group.id              = create_new\n"
    "auto.offset.reset     = earliest\n"
    "enable.auto.commit    = False\n"
    "session.timeout.ms    = 6000\n"
    "heartbeat.interval.ms = 1000\n")


STOP_LINE = re.compile(r"^stopped \((?P<reason>.*)\): (?P<messages>\d+) messages read, "
                       r"(?P<uploaded>\d+) files uploaded, (?P<skipped>\d+) already in "
                       r"Girder, (?P<failed>\d+) failed"
                       r"(?:, (?P<found>\d+) re-read and found in Girder)?\b", re.MULTILINE)


def write_fault_config(path: Path) -> Path:
    """A consumer config file for fault tests (see :data:`FAULT_CONSUMER_CONFIG`)."""
    debug = os.environ.get("GUS_TEST_RDKAFKA_DEBUG")
    path.write_text(FAULT_CONSUMER_CONFIG + (f"debug = {debug}\n" if debug else ""))
    return path


def consumer_env(stack_env: dict[str, str], prefect_env: dict[str, str],
                 failpoints: str | None = None) -> dict[str, str]:
    """Environment of a consumer subprocess: the broker, the Girder API key (kept out of
    the process list), the session's Prefect server for tests marked ``prefect`` (see the
    ``prefect_env`` fixture; none otherwise) and optionally ``GUS_FAILPOINTS``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GUS_FAILPOINTS", "PREFECT_API_URL")}
    env.update(prefect_env)  # {} unless the test is marked ``prefect``
    env["KAFKA_BOOTSTRAP_SERVERS"] = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    env["GIRDER_API_KEY"] = stack_env["GIRDER_API_KEY"]
    env["PYTHONIOENCODING"] = "utf-8"
    if failpoints:
        env["GUS_FAILPOINTS"] = failpoints
    return env


def consumer_argv(api_url: str, topic: str, collection_name: str, output_dir: Path,
                  group: str, config: Path | str = "local", max_idle: float = 8,
                  *extra: str) -> list[str]:
    """``girder-upload-stream run`` until idle for ``max_idle`` seconds."""
    return [str(OUR_CLI), "run", api_url, "--topic_name", topic, "--collection_name",
            collection_name, "--output_dir", str(output_dir), "--consumer_group_id", group,
            "--config", str(config), "--max_idle_seconds", f"{max_idle:g}",
            "--update_seconds", "5", *extra]


def stop_line(output: str) -> dict[str, Any]:
    """The CLI's final line ``stopped (...): N messages read, ...`` as numbers; fails the
    test if it is missing."""
    found = list(STOP_LINE.finditer(output))
    assert found, f"no 'stopped (...)' line in the output:\n{output[-6000:]}"
    last = found[-1]
    return {"reason": last["reason"], **{k: int(last[k]) for k in
                                         ("messages", "uploaded", "skipped", "failed")},
            "found": None if last["found"] is None else int(last["found"])}


def stackctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m stack.stackctl ARGS`` for the stack this session uses (its ports and
    folder come from the GUS_* variables of the environment)."""
    done = subprocess.run([sys.executable, "-m", "stack.stackctl", *args], cwd=REPO_ROOT,
                          text=True, capture_output=True, timeout=timeout)
    assert done.returncode == 0, (f"stackctl {' '.join(args)} failed ({done.returncode}):\n"
                                  f"{done.stdout}\n{done.stderr}")
    return done


def girder_serves(api_url: str) -> bool:
    import requests
    try:
        return requests.get(f"{api_url}/system/version", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def kafka_serves(bootstrap: str, topic: str | None = None) -> bool:
    """True when the broker answers metadata (for ``topic``: with a leader for each of
    its partitions)."""
    from confluent_kafka.admin import AdminClient
    try:
        # log_level 2: no "Connection refused" lines while the broker is down.
        metadata = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2}).list_topics(
            topic, timeout=3)
    except Exception:  # noqa: BLE001 - KafkaException while the broker is down
        return False
    if not metadata.brokers:
        return False
    if topic is None:
        return True
    found = metadata.topics.get(topic)
    return (found is not None and found.error is None and bool(found.partitions)
            and all(p.leader >= 0 for p in found.partitions.values()))
