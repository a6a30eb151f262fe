"""Shared helpers of the upload-flow and CLI integration tests: producing files (with the
real OpenMSIStream 1.8.8 producers from ``.venv-openmsistream`` and with ours), reading
back what landed in Girder, and Kafka offset book-keeping.

OpenMSIStream (GPL) is only ever run as a black box, through its console scripts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

