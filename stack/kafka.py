"""Apache Kafka 4.x as a single-node KRaft broker, assembled from Maven Central.

No Kafka distribution is downloaded: ``stack/kafka/pom.xml`` resolves ``kafka_2.13``
and its runtime dependencies (plus a log4j2 binding for slf4j) into
``.stack/kafka/libs/``, and the broker runs straight from those jars on the
machine's JDK. One process is both controller and broker (``node.id=1``) with a
static one-voter quorum, so it needs no other node and survives restarts.

Layout under ``.stack/kafka/``: ``libs/`` (jars and the pom's checksum),
``server.properties``, ``log4j2.properties`` and ``data/`` (metadata and topic logs).
The broker logs to ``.stack/logs/kafka.log``. Ports: ``GUS_KAFKA_PORT`` (default
29092) for clients, the next port for the controller.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from stack.common import (HOST, REPO_ROOT, ComponentError, component_dir, java_executable,
                          log_path, port_open, read_pid, record_port, recorded_port,
                          rss_kib, spawn, stop_pid,
                          wait_for_port)

__all__ = ["NAME", "DEFAULT_PORT", "port", "install", "start", "stop", "status", "env"]

NAME = "kafka"
DEFAULT_PORT = 29092

_POM = REPO_ROOT / "stack" / "kafka" / "pom.xml"
_MARKER = ".pom.sha256"
# Printed by KafkaRaftServer once the broker is unfenced and serving requests.
_READY_LINE = b"Kafka Server started"
_START_TIMEOUT = 120.0
_JVM_FLAGS = (
    "-Xms256m", "-Xmx512m",
    # Short pauses matter more than throughput for a test broker on 2 cores.
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


def port() -> int:
    """The port of the running broker, else the one it will use (GUS_KAFKA_PORT).

    The controller listens on the next port.
    """
    return recorded_port(NAME, "GUS_KAFKA_PORT", DEFAULT_PORT)


def _home() -> Path:
    return component_dir(NAME)


def _libs() -> Path:
    return _home() / "libs"


def _installed_digest() -> str | None:
    try:
        return (_libs() / _MARKER).read_text().strip()
    except FileNotFoundError:
        return None


def install() -> None:
    """Copy Kafka's jars into ``.stack/kafka/libs`` unless they match the current pom."""
    digest = hashlib.sha256(_POM.read_bytes()).hexdigest()
    if _installed_digest() == digest and any(_libs().glob("kafka_2.13-*.jar")):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ComponentError("`mvn` (Maven 3.8+) is needed to fetch Kafka from Maven Central")
    # Resolve into a fresh folder and swap it in, so a failed or changed resolution
    # never leaves a mix of two Kafka versions on the class path.
    staging = _home() / "libs.new"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[stack] {NAME}: resolving jars from Maven Central (pom {_POM.name}) ...", flush=True)
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(_POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise ComponentError(f"Maven could not resolve Kafka:\n{result.stdout}{result.stderr}")
    (staging / _MARKER).write_text(digest + "\n")
    shutil.rmtree(_libs(), ignore_errors=True)
    staging.rename(_libs())


# Broker settings that do not depend on ports or paths.
_TUNING = {
    # Topics are created explicitly; a typo in a topic name must fail loudly.
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    # Internal topics: one replica, and few partitions so the first consumer group
    # or transaction does not wait for 50 partitions to be created.
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    # Fast group (re)joins: no initial delay, and allow the short session
    # timeouts that tests use to notice a killed consumer quickly.
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",
    "group.consumer.min.session.timeout.ms": "1000",
    "group.consumer.session.timeout.ms": "10000",
    "group.consumer.min.heartbeat.interval.ms": "500",
    "group.consumer.heartbeat.interval.ms": "1000",
    # Chunk messages are 512 KiB plus headers; allow whole files up to 16 MiB.
    "message.max.bytes": str(16 * 1024 * 1024),
    "replica.fetch.max.bytes": str(16 * 1024 * 1024),
    # Small segments and a day of retention keep .stack/ small across test runs.
    "log.segment.bytes": str(64 * 1024 * 1024),
    "log.retention.hours": "24",
    "log.retention.bytes": str(512 * 1024 * 1024),
    "log.retention.check.interval.ms": "60000",
    # The compaction buffer defaults to 128 MiB of heap; 16 MiB is plenty here.
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
}


def _server_properties(data: Path, listen: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # A static single-voter quorum: unlike a dynamic (--standalone) quorum it keeps
        # no endpoint in the metadata log, so changing GUS_KAFKA_PORT needs no re-format.
        "controller.quorum.voters": f"1@{HOST}:{listen + 1}",
        "listeners": f"PLAINTEXT://{HOST}:{listen},CONTROLLER://{HOST}:{listen + 1}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{listen}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        **_TUNING,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


# Everything goes to stdout, which spawn() appends to .stack/logs/kafka.log.
_LOG4J2 = """\
status = warn
name = gus-kafka
# Kafka logs its own shutdown from a JVM hook; log4j's hook would close the
# appender first and the shutdown lines would be lost.
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
# Every config object dumps all of its ~300 values at INFO (several per start);
# server.properties next to the data is the readable record of the settings.
logger.configdump.name = org.apache.kafka.common.config.AbstractConfig
logger.configdump.level = WARN
"""


def _write_config(listen: int) -> Path:
    """Write server.properties and log4j2.properties; return the former's path."""
    home = _home()
    (home / "data").mkdir(exist_ok=True)
    (home / "log4j2.properties").write_text(_LOG4J2)
    props = home / "server.properties"
    props.write_text(_server_properties(home / "data", listen))
    return props


def _java_argv(main_class: str, *args: str, jvm_flags: tuple[str, ...] = _JVM_FLAGS) -> list[str]:
    log4j_config = _home() / "log4j2.properties"
    return [java_executable(), *jvm_flags, f"-Dlog4j2.configurationFile={log4j_config}",
            "-cp", str(_libs() / "*"), main_class, *args]


def _cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # would read as an option on the command line
            return text


def _format_once(props: Path) -> None:
    """Format the storage directory the first time; later starts reuse the data."""
    if (_home() / "data" / "meta.properties").exists():
        return
    argv = _java_argv("kafka.tools.StorageTool", "format", "-t", _cluster_id(),
                      "-c", str(props), jvm_flags=("-Xmx256m", "-Djava.awt.headless=true"))
    with open(log_path(NAME), "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} format storage\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ComponentError(f"formatting {_home() / 'data'} failed; see its log: {log_path(NAME)}")


def _wait_until_serving(pid: int, log_offset: int, listen: int) -> None:
    """Wait for the broker's "started" line in the part of the log this start wrote."""
    deadline = time.monotonic() + _START_TIMEOUT
    wait_for_port(NAME, listen, timeout=_START_TIMEOUT, pid=pid)
    while time.monotonic() < deadline:
        with open(log_path(NAME), "rb") as log:
            log.seek(log_offset)
            if _READY_LINE in log.read():
                return
        if read_pid(NAME) != pid:
            raise ComponentError(f"{NAME} exited during start-up; see its log: {log_path(NAME)}")
        time.sleep(0.25)
    raise ComponentError(
        f"{NAME} did not report ready within {_START_TIMEOUT:.0f}s; see its log: {log_path(NAME)}")


def _check_ports_free(listen: int) -> None:
    for taken in (listen, listen + 1):
        if port_open(taken):
            raise ComponentError(
                f"{NAME}: {HOST}:{taken} is already in use by another process (not ours); "
                f"free it or set GUS_KAFKA_PORT; see its log: {log_path(NAME)}")


def start() -> None:
    """Start the broker (formatting storage on first use) and wait until it serves."""
    if read_pid(NAME) and port_open(port()):
        return
    stop_pid(NAME, timeout=30)  # a recorded process that is not serving is stale
    listen = port()  # GUS_KAFKA_PORT now that no broker is recorded
    _check_ports_free(listen)
    props = _write_config(listen)
    _format_once(props)
    log_offset = log_path(NAME).stat().st_size if log_path(NAME).exists() else 0
    record_port(NAME, listen)
    pid = spawn(NAME, _java_argv("kafka.Kafka", str(props)), cwd=_home())
    try:
        _wait_until_serving(pid, log_offset, listen)
    except ComponentError:
        stop_pid(NAME, timeout=30)
        raise


def stop() -> None:
    """SIGTERM makes Kafka close its logs cleanly (under a second here; 30 s allowed)."""
    stop_pid(NAME, timeout=30)


def status() -> str:
    pid = read_pid(NAME)
    if pid is None:
        return f"{NAME}: stopped"
    listen = port()
    state = "running" if port_open(listen) else "starting (port closed)"
    return f"{NAME}: {state} pid {pid} on {HOST}:{listen}, rss {rss_kib(pid) // 1024} MiB"


def env() -> dict[str, str]:
    """The running broker's address (its recorded port), else the one it will use."""
    return {"KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{port()}"}
