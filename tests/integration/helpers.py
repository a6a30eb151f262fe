"""Shared helpers of the upload-flow and CLI integration tests: producing files (with the
real OpenMSIStream 1.8.8 producers from ``.venv-openmsistream`` and with ours), reading
back what landed in Girder, and Kafka offset book-keeping.

OpenMSIStream (GPL) is only ever run as a black box, through its console scripts.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
OMSI_BIN = Path(os.environ.get("GUS_OPENMSISTREAM_VENV",
                               REPO_ROOT / ".venv-openmsistream")) / "bin"
OUR_BIN = REPO_ROOT / ".venv" / "bin"
OUR_CLI = OUR_BIN / "girder-upload-stream"
OUR_PROCESSOR = OUR_BIN / "GirderUploadStreamProcessor"
CHUNK_SIZE = 65_536
TIMEOUT = 60.0
VERSION_FIELD = "OpenMSIStreamVersion"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def n_chunks(data: bytes, chunk_size: int = CHUNK_SIZE) -> int:
    return -(-len(data) // chunk_size)


def write_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write ``{relative POSIX path: bytes}`` below ``root``; returns ``files``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def write_omsi_config(path: Path, bootstrap: str) -> Path:
    """A config file for OpenMSIStream's own programs (and usable by ours)."""
    path.write_text(
        "[broker]\n"
        f"bootstrap.servers = {bootstrap}\n"
        "\n[producer]\n"
        "key.serializer   = StringSerializer\n"
        "value.serializer = DataFileChunkSerializer\n"
        "\n[consumer]\n"
        "group.id           = create_new\n"
        "auto.offset.reset  = earliest\n"
        "enable.auto.commit = False\n"
        "key.deserializer   = StringDeserializer\n"
        "value.deserializer = DataFileChunkDeserializer\n")
    return path


# --------------------------------------------------------------------------- programs

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


# --------------------------------------------------------------------------- producing

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


# --------------------------------------------------------------------------- Kafka

def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """``{partition: high watermark}`` of ``topic``."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused-watermarks",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(meta.topics[topic].partitions)}
    finally:
        consumer.close()


def committed_offsets(admin, group: str, topic: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` on ``topic`` (negative: none)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {tp.partition: tp.offset for tp in result.topic_partitions if tp.topic == topic}


def drop_span_lists(admin, group: str, topic: str) -> dict[int, str]:
    """Re-commit ``group``'s offsets on ``topic`` with only the high watermark in their
    metadata (``gus1:hw=N``, as earlier builds wrote it: no offsets rule 8 span list);
    the group must have no member. Returns the metadata now committed per partition."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    current = futures[group].result(timeout=30).topic_partitions
    legacy = [TopicPartition(tp.topic, tp.partition, tp.offset,
                             metadata=(tp.metadata or "").split(";", 1)[0])
              for tp in current if tp.topic == topic and tp.offset >= 0]
    futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, legacy)])
    futures[group].result(timeout=30)
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    return {tp.partition: tp.metadata for tp in futures[group].result(timeout=30).topic_partitions
            if tp.topic == topic}


def topic_messages(bootstrap: str, topic: str, group: str, n_expected: int,
                   timeout: float = TIMEOUT) -> list:
    """Every message of ``topic`` (at least ``n_expected``), read with a plain consumer."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    messages: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < n_expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=1.0):
                assert msg.error() is None, msg.error()
                messages.append(msg)
        for msg in consumer.consume(num_messages=500, timeout=1.0):  # any extra
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) >= n_expected, (
        f"read only {len(messages)} of {n_expected} messages from {topic} in {timeout:.0f}s")
    return messages


# --------------------------------------------------------------------------- Girder

@dataclass
class GirderTree:
    """What is below a Girder folder: items and sub-folders by relative POSIX path."""

    items: dict[str, dict] = field(default_factory=dict)
    folders: dict[str, dict] = field(default_factory=dict)


def girder_tree(gc, folder_id: str) -> GirderTree:
    """Walk ``folder_id`` with listFolder/listItem (by name, recursively)."""
    tree = GirderTree()

    def walk(fid: str, prefix: str) -> None:
        for item in gc.listItem(fid):
            tree.items[prefix + item["name"]] = item
        for folder in gc.listFolder(fid, parentFolderType="folder"):
            rel = prefix + folder["name"]
            tree.folders[rel] = folder
            walk(folder["_id"], rel + "/")

    walk(folder_id, "")
    return tree


def download_item(gc, item: dict) -> bytes:
    """The bytes of a one-file item (one request; several files would come as a zip)."""
    return gc.get(f"item/{item['_id']}/download", jsonResp=False).content


def item_path(gc, item: dict) -> str:
    return gc.get(f"resource/{item['_id']}/path", parameters={"type": "item"})


def default_root_path(collection_name: str, topic: str) -> str:
    """Girder path of the default root folder ``{collection_name}/{topic_name}``: every
    part is a folder below the collection, as OpenMSIStream 1.8.8 makes it."""
    return f"/collection/{collection_name}/{collection_name}/{topic}"


def folder_by_path(gc, path: str) -> dict:
    """A folder by its Girder path, e.g. ``/collection/C/topic``."""
    return gc.get("resource/lookup", parameters={"path": path})


def assert_uploaded(gc, root_folder_id: str, expected: dict[str, bytes], topic: str,
                    metadata: dict | None = None, root_path: str | None = None,
                    exact: bool = True) -> GirderTree:
    """Every expected file is an item at its mirrored path below the root folder, with
    identical bytes and the metadata of the facts file; folders made for sub-folders
    carry the metadata without a checksum. With ``exact``, nothing else is there."""
    metadata = metadata or {}
    tree = girder_tree(gc, root_folder_id)
    if exact:
        assert sorted(tree.items) == sorted(expected), (
            f"items in Girder != files produced\nonly in Girder: "
            f"{sorted(set(tree.items) - set(expected))}\nmissing: "
            f"{sorted(set(expected) - set(tree.items))}")
    else:
        missing = sorted(set(expected) - set(tree.items))
        assert not missing, f"missing in Girder: {missing}; present: {sorted(tree.items)}"
    for rel, data in expected.items():
        item = tree.items[rel]
        meta = item.get("meta") or {}
        assert meta.get("KafkaTopic") == topic, (rel, meta)
        assert meta.get("checksum") == {"sha256": sha256(data)}, (rel, meta)
        assert str(meta.get(VERSION_FIELD, "")).startswith("girder-upload-stream"), (rel, meta)
        for key, value in metadata.items():
            assert meta.get(key) == value, f"{rel}: --metadata {key!r} missing: {meta}"
        got = download_item(gc, item)
        assert got == data, f"{rel}: downloaded {len(got)} bytes differ from the {len(data)} produced"
    if root_path is not None and expected:
        # The walk above found each item by name; Girder's own path of the deepest agrees.
        deepest = max(expected, key=lambda rel: rel.count("/"))
        path = item_path(gc, tree.items[deepest])
        assert path == f"{root_path}/{deepest}", (deepest, path)
    subdirs = {"/".join(rel.split("/")[:i]) for rel in expected
               for i in range(1, rel.count("/") + 1)}
    assert subdirs <= set(tree.folders), f"folders missing: {sorted(subdirs - set(tree.folders))}"
    for rel in subdirs:
        meta = tree.folders[rel].get("meta") or {}
        assert meta.get("KafkaTopic") == topic, (rel, meta)
        assert VERSION_FIELD in meta, (rel, meta)
        assert "checksum" not in meta, (rel, meta)
        for key, value in metadata.items():
            assert meta.get(key) == value, f"folder {rel}: --metadata {key!r} missing: {meta}"
    return tree


def processed_rel_paths(logs_dir: Path, topic: str, group: str) -> list[str]:
    """Relative paths in the processed registry of ``topic``/``group`` (all parts)."""
    from girder_upload_stream.registry import read_processed
    return [row.rel_filepath.as_posix() for row in read_processed(logs_dir, topic, group).rows]



# --------------------------------------------------------------------------- fault tests
# Helpers of the crash, outage, bad-input and restart-cost tests (issue 5): the consumer
# is always the real CLI, as a subprocess stopped (or killed) by its own PID.

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
    path.write_text(FAULT_CONSUMER_CONFIG)
    return path


def log_uniform_files(n: int | None, seed: int, min_size: int, max_size: int,
                      folders: tuple[str, ...] = ("", "run1", "run1/sample A",
                                                  "run1/sample A/raw", "run2/ü/deep/er"),
                      total_bytes: int | None = None) -> dict[str, bytes]:
    """``n`` files of random bytes (or as many as make ``total_bytes``, the last one
    trimmed), sizes log-uniform in [min_size, max_size], spread over ``folders``
    (``""`` is the root); deterministic for a seed."""
    assert n is not None or total_bytes is not None
    rng = random.Random(seed)
    log_min, log_max = math.log(min_size), math.log(max_size)
    files: dict[str, bytes] = {}
    total = 0
    index = 0
    while (n is None or index < n) and (total_bytes is None or total < total_bytes):
        size = int(round(math.exp(rng.uniform(log_min, log_max))))
        if total_bytes is not None:
            size = min(size, total_bytes - total)
        folder = folders[index % len(folders)]
        name = f"f{index:04d}.bin"
        files[f"{folder}/{name}" if folder else name] = rng.randbytes(size)
        total += size
        index += 1
    return files


def consumer_env(stack_env: dict[str, str], prefect_env: dict[str, str],
                 failpoints: str | None = None) -> dict[str, str]:
    """Environment of a consumer subprocess: the broker, the Girder API key (kept out of
    the process list), the session's Prefect server and optionally ``GUS_FAILPOINTS``."""
    env = {k: v for k, v in os.environ.items() if k != "GUS_FAILPOINTS"}
    env.update(prefect_env)
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


@contextlib.contextmanager
def component_stopped(component: str, serves: Callable[[], bool], timeout: float = 120):
    """Stop one stack component for the ``with`` block; start it again afterwards (even
    if the block fails) and wait until ``serves()``."""
    stackctl("down", component)
    try:
        yield
    finally:
        stackctl("up", component)
        deadline = time.monotonic() + timeout
        while not serves():
            if time.monotonic() > deadline:
                raise AssertionError(f"{component} does not serve {timeout:.0f}s after up")
            time.sleep(0.5)


class BackgroundProducer(threading.Thread):
    """Produces files as chunk messages from a thread, one file every ``interval``
    seconds (``encode_chunk`` of :mod:`girder_upload_stream.codec`, i.e. what
    ``girder-upload-stream produce`` sends), through a plain confluent-kafka producer
    that rides out broker restarts (idempotent, long delivery timeout)."""

    def __init__(self, bootstrap: str, topic: str, files: dict[str, bytes],
                 interval: float, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(name=f"producer-{topic}", daemon=True)
        self.bootstrap, self.topic, self.files = bootstrap, topic, files
        self.interval, self.chunk_size = interval, chunk_size
        self.sent = self.acked = 0
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failures.append(f"{msg.key()!r}: {err}")
        else:
            self.acked += 1

    def run(self) -> None:
        from confluent_kafka import Producer
        from girder_upload_stream.codec import chunk_file, encode_chunk
        try:
            producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 20,
                                 "enable.idempotence": True,
                                 "message.timeout.ms": 300_000, "log_level": 2,
                                 "message.max.bytes": self.chunk_size + 65_536})
            for rel, data in self.files.items():
                subdir, _, name = rel.rpartition("/")
                for chunk in chunk_file(data, subdir, self.chunk_size, filename=name):
                    key, value = encode_chunk(chunk)
                    while True:
                        try:
                            producer.produce(self.topic, value=value, key=key.encode(),
                                             on_delivery=self._delivered)
                            break
                        except BufferError:
                            producer.poll(0.5)
                    self.sent += 1
                    producer.poll(0)
                time.sleep(self.interval)
            remaining = producer.flush(240)
            if remaining:
                self.failures.append(f"{remaining} message(s) not delivered after 240 s")
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def finish(self, timeout: float = 300) -> None:
        """Wait for the thread; fail if any message was not acknowledged."""
        self.join(timeout)
        assert not self.is_alive(), f"the producer of {self.topic} is still running"
        assert self.error is None, f"the producer failed: {self.error!r}"
        assert not self.failures and self.acked == self.sent, (
            f"acknowledged {self.acked}/{self.sent}; failures: {self.failures[:10]}")


def produce_raw(bootstrap: str, topic: str,
                messages: list[tuple[bytes | str | None, bytes | None, int | None]]
                ) -> list[tuple[int, int]]:
    """Produce ``(key, value, partition)`` messages as they are (``None`` key: no key;
    ``None`` partition: the default partitioner); returns each one's (partition, offset)
    in order."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "enable.idempotence": True, "message.max.bytes": 8 << 20})
    where: list[tuple[int, int] | None] = [None] * len(messages)
    errors: list[str] = []

    def delivered(index: int):
        def callback(err, msg) -> None:
            if err is not None:
                errors.append(f"message {index}: {err}")
            else:
                where[index] = (msg.partition(), msg.offset())
        return callback

    for index, (key, value, partition) in enumerate(messages):
        kwargs: dict[str, Any] = {"value": value, "on_delivery": delivered(index)}
        if key is not None:
            kwargs["key"] = key.encode() if isinstance(key, str) else key
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, **kwargs)
        producer.poll(0)
    assert producer.flush(60) == 0, "messages still queued after 60 s"
    assert not errors and all(w is not None for w in where), errors
    return where  # type: ignore[return-value]


@dataclass
class GirderListing:
    """Everything below a Girder folder, duplicates kept: (relative path, document)."""

    items: list[tuple[str, dict]] = field(default_factory=list)
    folders: list[tuple[str, dict]] = field(default_factory=list)


def girder_listing(gc, parent_id: str, parent_type: str = "folder") -> GirderListing:
    """Walk a folder (or a collection) with paging, keeping same-named siblings apart."""
    listing = GirderListing()

    def walk(pid: str, ptype: str, prefix: str) -> None:
        if ptype == "folder":
            for item in gc.listItem(pid):
                listing.items.append((prefix + item["name"], item))
        for folder in gc.listFolder(pid, parentFolderType=ptype):
            rel = prefix + folder["name"]
            listing.folders.append((rel, folder))
            walk(folder["_id"], "folder", rel + "/")

    walk(parent_id, parent_type, "")
    return listing


def complete_in_girder(gc, root_folder_id: str, files: dict[str, bytes]) -> set[str]:
    """The expected files that are items of their full size below the root (an item
    created but not given its file yet has size 0)."""
    tree = girder_tree(gc, root_folder_id)
    return {rel for rel, item in tree.items.items()
            if rel in files and item.get("size") == len(files[rel])}


def root_folder_or_none(gc, root_path: str) -> dict | None:
    try:
        return folder_by_path(gc, root_path)
    except Exception:  # noqa: BLE001 - Girder answers 400 until the folder exists
        return None


def assert_exactly_once(gc, root_folder_id: str, files: dict[str, bytes], topic: str,
                        root_path: str | None = None) -> GirderTree:
    """Every file is in Girder exactly once: one item per file at its path (none else),
    right bytes and sha256, exactly one Girder file per item, no two items or folders of
    the same name in one folder, and no folder that no file needs."""
    listing = girder_listing(gc, root_folder_id)
    for kind, entries in (("item", listing.items), ("folder", listing.folders)):
        counts = collections.Counter(rel for rel, _ in entries)
        doubled = sorted(rel for rel, n in counts.items() if n > 1)
        assert not doubled, f"{kind}s that appear more than once in their folder: {doubled}"
    several = {}
    for rel, item in listing.items:
        item_files = list(gc.listFile(item["_id"]))
        if len(item_files) != 1:
            several[rel] = [(f["name"], f.get("size")) for f in item_files]
    assert not several, f"items without exactly one file: {several}"
    tree = assert_uploaded(gc, root_folder_id, files, topic, root_path=root_path, exact=True)
    subdirs = {"/".join(rel.split("/")[:i]) for rel in files
               for i in range(1, rel.count("/") + 1)}
    assert set(tree.folders) == subdirs, (
        f"unexpected folders below the root: {sorted(set(tree.folders) - subdirs)}")
    return tree


def in_progress_rows(logs_dir: Path, topic: str, group: str) -> list:
    """The rows of the in-progress registry of ``topic``/``group``, as saved on disk."""
    from girder_upload_stream.registry import InProgressTable
    return InProgressTable.open(logs_dir, topic, group).rows()


def tree_snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns, sha256 or link target)}`` of everything
    below ``root`` (symlinks not followed), leaving out ``skip`` and what is below it."""
    snapshot: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if skip is not None and path == skip:
                continue
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                snapshot[rel] = ("link", 0, st.st_mtime_ns, os.readlink(path))
            elif path.is_dir():
                snapshot[rel] = ("dir", 0, st.st_mtime_ns, "")
            else:
                snapshot[rel] = ("file", st.st_size, st.st_mtime_ns,
                                 sha256(path.read_bytes()))
    return snapshot


def committed_with_metadata(admin, group: str, topic: str) -> dict[int, tuple[int, str]]:
    """``{partition: (committed offset, commit metadata)}`` of ``group`` on ``topic``."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {tp.partition: (tp.offset, tp.metadata or "") for tp in result.topic_partitions
            if tp.topic == topic}


def messages_at(bootstrap: str, topic: str, offsets: dict[int, int],
                timeout: float = 30.0) -> dict[int, tuple[bytes | None, bytes | None]]:
    """``{partition: (key, value)}`` of the message at each given offset (for diagnoses)."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused-diagnosis",
                         "enable.auto.commit": False, "fetch.message.max.bytes": 16 << 20})
    found: dict[int, tuple[bytes | None, bytes | None]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items() if o >= 0])
        deadline = time.monotonic() + timeout
        while len(found) < sum(1 for o in offsets.values() if o >= 0) \
                and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10, timeout=1.0):
                if msg.error() is None and msg.partition() not in found \
                        and msg.offset() == offsets[msg.partition()]:
                    found[msg.partition()] = (msg.key(), msg.value())
    finally:
        consumer.close()
    return found
