"""Wire compatibility with the real OpenMSIStream 1.8.8, in both directions, on the broker.

1. OpenMSIStream's own producers (``UploadDataFile`` for one file,
   ``DataFileUploadDirectory --upload_existing`` for a tree) -> our ``decode_chunk`` and
   ``Reassembler`` (memory and disk modes) rebuild every file byte for byte.
2. Our ``girder-upload-stream produce`` -> OpenMSIStream's ``DataFileDownloadDirectory``
   rebuilds every file byte for byte, at the same relative path.

OpenMSIStream (GPL) is only ever run as a black box: its console scripts, from the
separate ``.venv-openmsistream`` that ``make install`` creates. Its long-running programs
are stopped the way their users stop them: ``q`` on stdin (SIGTERM as a fallback).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from girder_upload_stream.wire.codec import decode_chunk
from girder_upload_stream.assembly.reassembly import AddStatus, Reassembler
from tests.integration.kafka_checks import end_offsets
from tests.integration.local_files import CHUNK_SIZE, n_chunks
from tests.integration.programs import (OMSI_BIN, OUR_CLI, Program, TIMEOUT, wait_for, write_omsi_config)

pytestmark = pytest.mark.integration

BIG_SIZE = 5 * 1024 * 1024  # 80 chunks of 64 KiB


@pytest.fixture(autouse=True)
def _openmsistream_installed() -> None:
    # `make install` always creates this venv: its absence is a failure, never a skip.
    if not (OMSI_BIN / "DataFileDownloadDirectory").exists():
        pytest.fail(f"OpenMSIStream is not installed in {OMSI_BIN.parent} (run `make install`)")


# ----------------------------------------------------------------------------- helpers

def _write_tree(root: Path, seed: int) -> dict[str, bytes]:
    """A deterministic source tree: 3 nested levels, non-ASCII names, one multi-chunk file
    in the deepest folder, small files, a 1-byte file and an exact-chunk-size file.
    Returns ``{relative POSIX path: bytes}``."""
    rng = random.Random(seed)
    files = {
        "racine.txt": b"a file at the root\n",
        "données/été.txt": "Où est l'été ? Ça dépend.\n".encode() * 7,
        "données/niveau2/chaîne.csv": b"x;y\n" + b"".join(
            f"{i};{rng.random():.6f}\n".encode() for i in range(500)),
        "données/niveau2/niveau3/profond.bin": rng.randbytes(1_000_000 + 17),  # 16 chunks
        "日本/データ.bin": rng.randbytes(3 * CHUNK_SIZE),  # exactly 3 chunks
        "日本/東京/一.dat": b"\x01",
        "a/b/c/deep spaced name (1).bin": rng.randbytes(CHUNK_SIZE + 1),  # 2 chunks
        "a/b/small.json": b'{"k": [1, 2, 3], "\xc3\xa9": null}',
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _consume_all(bootstrap: str, topic: str, group: str, n_expected: int) -> list:
    """Every message of ``topic`` (at least ``n_expected``), read with a plain consumer."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    messages: list = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(messages) < n_expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=1.0):
                assert msg.error() is None, msg.error()
                messages.append(msg)
        # Anything beyond the expected count (a producer retry) must be read too.
        for msg in consumer.consume(num_messages=500, timeout=1.0):
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) >= n_expected, (
        f"read only {len(messages)} of {n_expected} messages from {topic} in {TIMEOUT:.0f}s")
    return messages


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def omsi_config(tmp_path: Path, kafka_bootstrap: str) -> Path:
    return write_omsi_config(tmp_path / "openmsistream.config", kafka_bootstrap)


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    """Programs a test starts; each is stopped (by its PID) even if the test fails."""
    started: list[Program] = []
    yield started
    for program in started:
        program.stop(timeout=10)


# ------------------------------------------------- 1. real OpenMSIStream -> our reassembly

@pytest.mark.timeout(180)
def test_openmsistream_producers_to_our_reassembler(tmp_path, kafka_bootstrap, make_topic,
                                                    make_group, omsi_config, programs):
    topic = make_topic(partitions=4)

    # One big file with UploadDataFile (it lands at the root: empty subdir).
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    big_name = "grand fichier é.bin"
    big = random.Random(1).randbytes(BIG_SIZE)
    (single_dir / big_name).write_bytes(big)
    run = subprocess.run(
        [str(OMSI_BIN / "UploadDataFile"), str(single_dir / big_name), "--config",
         str(omsi_config), "--topic_name", topic, "--chunk_size", str(CHUNK_SIZE)],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert run.returncode == 0, f"UploadDataFile failed:\n{run.stdout}\n{run.stderr}"
    assert n_chunks(big) == 80

    # A tree with DataFileUploadDirectory, plus files its default upload regex skips.
    tree = tmp_path / "tree"
    expected = _write_tree(tree, seed=2)
    skipped = {".cachée": b"hidden at the root", "données/.cachée": b"hidden below",
               "journal.log": b"a log file", "a/catalog.txt": b"contains 'log' after a char"}
    for rel, data in skipped.items():
        (tree / rel).write_bytes(data)
    n_expected = n_chunks(big) + sum(n_chunks(data) for data in expected.values())
    uploader = Program(
        [str(OMSI_BIN / "DataFileUploadDirectory"), str(tree), "--config", str(omsi_config),
         "--topic_name", topic, "--chunk_size", str(CHUNK_SIZE), "--upload_existing",
         "--watchdog_lag_time", "1", "--update_seconds", "-1"],
        tmp_path / "DataFileUploadDirectory.out", cwd=tmp_path)
    programs.append(uploader)
    extra = (tree / "LOGS" / "DataFileUploadDirectory.log",)
    wait_for(lambda: sum(end_offsets(kafka_bootstrap, topic).values()) >= n_expected,
              f"{n_expected} chunk messages on {topic}", uploader, extra)
    code = uploader.stop()
    assert code == 0, f"DataFileUploadDirectory did not stop cleanly\n{uploader.describe(extra)}"
    for rel in expected:
        assert rel in uploader.output(), f"{rel} not reported uploaded\n{uploader.describe()}"

    messages = _consume_all(kafka_bootstrap, topic, make_group(), n_expected)
    chunks = [decode_chunk(m.value(), m.key(), topic=m.topic(), partition=m.partition(),
                           offset=m.offset()) for m in messages]
    assert {m.partition() for m in messages} == {0, 1, 2, 3}, "chunks not spread over partitions"

    expected[big_name] = big
    mtimes = {rel: (tree / rel).stat().st_mtime for rel in expected if rel != big_name}
    mtimes[big_name] = (single_dir / big_name).stat().st_mtime
    by_file: dict[str, set[int]] = {}
    for chunk in chunks:
        by_file.setdefault(chunk.rel_path, set()).add(chunk.chunk_i)
    assert sorted(by_file) == sorted(expected), (
        f"files on the topic != expected (OpenMSIStream's default upload regex should "
        f"skip {sorted(skipped)})")
    for chunk in chunks:
        assert chunk.n_total_chunks == n_chunks(expected[chunk.rel_path]), chunk
    for rel, indexes in by_file.items():
        assert indexes == set(range(1, n_chunks(expected[rel]) + 1)), rel

    # Memory mode gets the broker's order; disk mode a seeded shuffle with duplicates.
    shuffled = chunks + random.Random(3).sample(chunks, 25)
    random.Random(4).shuffle(shuffled)
    out_dir = tmp_path / "rebuilt"
    for mode, order in (("memory", chunks), ("disk", shuffled)):
        reassembler = Reassembler(mode, output_dir=out_dir if mode == "disk" else None,
                                  max_file_bytes=64 * 1024 * 1024)
        completed = {}
        for chunk in order:
            result = reassembler.add(chunk)
            assert result.status != AddStatus.REJECTED, (mode, result)
            if result.status == AddStatus.COMPLETED:
                assert result.completed.rel_path not in completed, f"{mode}: completed twice"
                completed[result.completed.rel_path] = result.completed
        assert set(completed) == set(expected), f"{mode}: rebuilt {sorted(completed)}"
        for rel, data in expected.items():
            done = completed[rel]
            assert done.size == len(data) and done.sha256 == _sha256(data), (mode, rel)
            assert done.n_chunks == n_chunks(data), (mode, rel)
            assert done.file_mtime == pytest.approx(mtimes[rel], abs=1e-3), (mode, rel)
            if mode == "memory":
                assert done.data == data, f"memory: {rel} differs"
            else:  # the verified staging file, which the upload reads
                assert done.path.parent == reassembler.staging_dir, (done.path, rel)
                assert done.path.read_bytes() == data, f"disk: {rel} differs"
    staged = sorted(p.name for p in reassembler.staging_dir.iterdir())
    assert staged == sorted(f.path.name for f in completed.values()), staged
    elsewhere = [p for p in out_dir.rglob("*")
                 if p.is_file() and reassembler.staging_dir not in p.parents]
    assert not elsewhere, f"disk mode wrote files outside its staging folder: {elsewhere}"


# ------------------------------------------------- 2. our producer -> real OpenMSIStream

@pytest.mark.timeout(180)
def test_our_producer_to_openmsistream_download_directory(tmp_path, kafka_bootstrap,
                                                          make_topic, make_group, omsi_config,
                                                          programs):
    topic = make_topic(partitions=4)
    tree = tmp_path / "tree"
    expected = _write_tree(tree, seed=5)
    big_rel = "données/niveau2/niveau3/grand.bin"
    expected[big_rel] = random.Random(6).randbytes(BIG_SIZE)
    (tree / big_rel).write_bytes(expected[big_rel])
    (tree / "日本" / "vide.txt").write_bytes(b"")  # empty: never sent, never rebuilt

    run = subprocess.run(
        [str(OUR_CLI), "produce", str(tree), "--config", "local", "--topic_name", topic,
         "--chunk_size", str(CHUNK_SIZE)],
        cwd=tmp_path, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, f"our produce failed:\n{run.stdout}\n{run.stderr}"
    n_expected = sum(n_chunks(data) for data in expected.values())
    assert sum(end_offsets(kafka_bootstrap, topic).values()) == n_expected, run.stdout + run.stderr

    out_dir = tmp_path / "downloaded"
    downloader = Program(
        [str(OMSI_BIN / "DataFileDownloadDirectory"), str(out_dir), "--config",
         str(omsi_config), "--topic_name", topic, "--consumer_group_id", make_group(),
         "--n_threads", "2", "--update_seconds", "-1"],
        tmp_path / "DataFileDownloadDirectory.out", cwd=tmp_path)
    programs.append(downloader)
    extra = (out_dir / "DataFileDownloadDirectory.log",)
    hashes = {rel: _sha256(data) for rel, data in expected.items()}

    def all_rebuilt() -> bool:
        for rel, digest in hashes.items():
            path = out_dir / rel
            if not path.is_file() or path.stat().st_size != len(expected[rel]):
                return False
            if _sha256(path.read_bytes()) != digest:
                return False
        return True

    wait_for(all_rebuilt, f"{len(expected)} files rebuilt in {out_dir}", downloader, extra)
    code = downloader.stop()
    log = downloader.describe(extra)
    assert code == 0, f"DataFileDownloadDirectory did not stop cleanly\n{log}"
    assert f"{len(expected)} files were successfully reconstructed" in log, log
    assert f"{n_expected} total messages were consumed" in log, log

    # Exactly the expected files, at the expected paths, byte for byte.
    own_files = {"DataFileDownloadDirectory.log"}
    rebuilt = {p.relative_to(out_dir).as_posix(): p for p in out_dir.rglob("*")
               if p.is_file() and p.name not in own_files and "LOGS" not in p.parts}
    assert sorted(rebuilt) == sorted(expected), f"unexpected output files\n{log}"
    for rel, data in expected.items():
        assert rebuilt[rel].read_bytes() == data, f"{rel} differs"
