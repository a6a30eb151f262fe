"""``--rekey_by_file`` against the real stack (issue 23 §1): two hops, the first
re-producing the source topic to ``<topic>--<group>--by-file`` keyed by file, the
second rebuilding whole files from it in the group ``<group>--by-file``.

Files of several chunks (16 KiB chunks) are what one group of several processes could
not rebuild before; each test checks Girder (every file exactly once) and Kafka (the
commits of both groups, the internal topic's records)."""

from __future__ import annotations

import csv
import dataclasses
import random
import re
import subprocess
from pathlib import Path

import pytest

from girder_upload_stream.wire.commit_metadata import parse_failed
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from girder_upload_stream.loop.rekey_book import internal_group, internal_topic
from tests.integration.girder_checks import (assert_exactly_once, default_root_path,
                                             folder_by_path)
from tests.integration.kafka_checks import (committed_offsets, committed_with_metadata,
                                            end_offsets, low_offsets, produce_raw)
from tests.integration.local_files import write_tree
from tests.integration.programs import (Program, consumer_argv, consumer_env, finish,
                                        produce_ours, stop_line, wait_for)

pytestmark = pytest.mark.integration

CHUNK = 16 << 10
RUN_TIMEOUT = 180.0
#: The runs' timings: commits and purges without the production waits.
FAST = {"GUS_TIMING_REKEY_PURGE_SECONDS": "0", "GUS_TIMING_SHUTDOWN_GRACE_SECONDS": "5"}


def _files(n: int, seed: int) -> dict[str, bytes]:
    """``n`` files of 2 to 4 chunks of :data:`CHUNK` bytes."""
    rng = random.Random(seed)
    return {f"d{i % 3}/f{i:03d}.bin": rng.randbytes(CHUNK * (1 + i % 3) + 1 + i)
            for i in range(n)}


@pytest.fixture
def rekeyed(kafka_admin):
    """Factory ``rekeyed(topic, group) -> (internal topic, internal group)``; the
    internal topics are deleted after the test."""
    made: list[str] = []

    def factory(topic: str, group: str) -> tuple[str, str]:
        made.append(internal_topic(topic, group))
        return made[-1], internal_group(group)

    yield factory
    if made:
        kafka_admin.delete_topics(made, operation_timeout=30)


def _start(stack_env, prefect_env, programs, tmp_path: Path, topic: str, group: str,
           collection: str, index: int, *extra: str, max_idle: float = 6,
           env: dict[str, str] | None = None, rekey: bool = True) -> Program:
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection,
                         tmp_path / f"out-{index}", group, "local", max_idle, "--n_threads",
                         "2", *(["--rekey_by_file"] if rekey else []), *extra)
    program = Program(argv, tmp_path / f"consumer-{index}-{len(programs)}.out", cwd=tmp_path,
                      env={**consumer_env(stack_env, prefect_env), **FAST, **(env or {})},
                      stdin=subprocess.DEVNULL)
    programs.append(program)
    return program


def _produce(tmp_path: Path, files: dict[str, bytes], topic: str, bootstrap: str) -> None:
    write_tree(tmp_path / "tree", files)
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path, chunk_size=CHUNK),
           "our produce", timeout=120)


def _members(kafka_admin, group: str) -> int:
    """Members of ``group`` that have partitions assigned."""
    described = kafka_admin.describe_consumer_groups([group])[group].result(timeout=30)
    return sum(1 for m in described.members
               if m.assignment is not None and m.assignment.topic_partitions)


def _configs(kafka_admin, topic: str) -> dict[str, str]:
    from confluent_kafka.admin import ConfigResource, ResourceType
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = kafka_admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def _once_and_committed(girder_client, kafka_admin, bootstrap: str, collection: dict,
                        files: dict[str, bytes], *hops: tuple[str, str]) -> None:
    """Every file in Girder once, and each hop's ``(topic, group)`` committed to its end."""
    topic = hops[0][0]
    root_path = default_root_path(collection["name"], topic)
    assert_exactly_once(girder_client, folder_by_path(girder_client, root_path)["_id"],
                        files, topic, root_path=root_path)
    for hop_topic, hop_group in hops:
        _at_end(kafka_admin, bootstrap, hop_group, hop_topic)


def _at_end(kafka_admin, bootstrap: str, group: str, topic: str) -> None:
    ends = end_offsets(bootstrap, topic)
    committed = committed_offsets(kafka_admin, group, topic)
    assert {p: committed.get(p, -1) for p in ends} == ends, (group, topic, committed, ends)


@pytest.mark.timeout(400)
def test_two_processes_of_one_group_rebuild_multi_chunk_files_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs, kafka_admin, rekeyed):
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    inner, inner_group = rekeyed(topic, group)
    files = _files(40, 23)
    started = [_start(stack_env, prefect_env, programs, tmp_path, topic, group,
                      collection["name"], i, max_idle=10) for i in (1, 2)]
    # Produced once both processes are members of both groups: each gets a share.
    wait_for(lambda: _members(kafka_admin, group) == _members(kafka_admin, inner_group) == 2,
             "both processes in both groups", started[0], timeout=90)
    _produce(tmp_path, files, topic, bootstrap)
    assert sum(end_offsets(bootstrap, topic).values()) > len(files) * 2
    for program in started:
        assert program.wait(RUN_TIMEOUT) == 0, program.describe()
    lines = [stop_line(p.output()) for p in started]
    _once_and_committed(girder_client, kafka_admin, bootstrap, collection, files,
                        (topic, group), (inner, inner_group))
    assert sum(line["uploaded"] for line in lines) == len(files), lines
    assert all(line["uploaded"] > 0 for line in lines), lines  # split between them
    assert all(line["failed"] == 0 for line in lines), lines
    # The internal topic, as made: the source's shape, room for the headers, a retention.
    source_config, inner_config = _configs(kafka_admin, topic), _configs(kafka_admin, inner)
    assert len(end_offsets(bootstrap, inner)) == 4
    assert inner_config["cleanup.policy"] == "delete"
    assert inner_config["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert int(inner_config["max.message.bytes"]) == \
        int(source_config["max.message.bytes"]) + (64 << 10)
    # The registries name the source topic (their file names) and list every file once.
    rows = []
    for index in (1, 2):
        path = tmp_path / f"out-{index}" / "LOGS" / f"processed_from_{topic}_by_{group}.csv"
        with path.open(newline="") as stream:
            rows += list(csv.DictReader(stream, delimiter=";", quotechar="'"))
    assert sorted(row["rel_filepath"] for row in rows) == sorted(files), rows


@pytest.mark.timeout(300)
def test_a_hostile_message_goes_through_both_hops_and_is_registered_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs, kafka_admin, rekeyed):
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    letters = make_topic(partitions=1)
    inner, inner_group = rekeyed(topic, group)
    files = _files(4, 5)
    _produce(tmp_path, files, topic, bootstrap)
    [(partition, offset)] = produce_raw(bootstrap, topic, [(b"evil_chunk_1_of_1", b"\xc1junk", 1)])
    # A file whose chunks do not add up to its sha512: rejected whole (its dead letters
    # are read again by offset, from the internal topic).
    wrong = [encode_chunk(dataclasses.replace(chunk, file_hash=bytes(64)))
             for chunk in chunk_file(b"y" * (2 * CHUNK + 3), "", CHUNK, filename="bad.bin")]
    bad_at = produce_raw(bootstrap, topic, [(key, value, 0) for key, value in wrong])
    program = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                     collection["name"], 1, "--dead_letter_topic", letters,
                     env={"GUS_TIMING_REKEY_PURGE_SECONDS": "3600"})  # copies kept
    assert program.wait(RUN_TIMEOUT) == 0, program.describe()
    assert stop_line(program.output())["uploaded"] == len(files)
    # Logged once, named by its source coordinates (not the internal topic's).
    rejected = [line for line in program.output().splitlines() if "not msgpack" in line]
    assert len(rejected) == 1, rejected
    assert f"topic='{topic}', partition={partition}, offset={offset}" in rejected[0], rejected
    # One registry row, named by the source coordinates.
    in_progress = (tmp_path / "out-1" / "LOGS" /
                   f"consuming_from_{topic}_in_progress_by_{group}.csv")
    with in_progress.open(newline="") as stream:
        failed = [row for row in csv.DictReader(stream, delimiter=";", quotechar="'")
                  if row["status"] == "failed"]
    assert [row["rel_filepath"] for row in failed] == [f"message {topic}[{partition}]@{offset}"]
    extra = Path(f"{in_progress}.extra").read_text()
    assert f"'offset-{partition}-{offset}'" in extra and "not msgpack" in extra, extra
    # One dead letter, unchanged (original key), its headers naming the source.
    from tests.integration.kafka_checks import topic_messages
    found = topic_messages(bootstrap, letters, make_group(), 1 + len(wrong), timeout=30)
    [letter] = [m for m in found if m.value() == b"\xc1junk"]
    headers = dict(letter.headers())
    assert letter.key() == b"evil_chunk_1_of_1" and letter.value() == b"\xc1junk"
    assert headers["gus.errors.topic"] == topic.encode()
    assert headers["gus.errors.offset"] == str(offset).encode()
    assert headers["gus.errors.partition"] == str(partition).encode()
    file_letters = sorted((dict(m.headers())["gus.errors.topic"].decode(),
                           int(dict(m.headers())["gus.errors.partition"]),
                           int(dict(m.headers())["gus.errors.offset"]), m.key())
                          for m in found if m.value() != b"\xc1junk")
    assert file_letters == sorted((topic, p, o, key.encode())
                                  for (p, o), (key, _) in zip(bad_at, wrong)), file_letters
    _at_end(kafka_admin, bootstrap, group, topic)
    _at_end(kafka_admin, bootstrap, inner_group, inner)
    _assert_copies(bootstrap, topic, inner, make_group)


def _assert_copies(bootstrap: str, topic: str, inner: str, make_group) -> None:
    """The internal topic holds each source message once, its value unchanged, with
    the origin headers and nothing else; all chunks of a file in one partition."""
    from tests.integration.kafka_checks import topic_messages
    n = sum(end_offsets(bootstrap, topic).values())
    source = {(m.partition(), m.offset()): m for m in
              topic_messages(bootstrap, topic, make_group(), n, timeout=30)}
    copies = topic_messages(bootstrap, inner, make_group(), n, timeout=30)
    assert len(copies) == n == len(source)
    where: dict[bytes, set[int]] = {}
    for copy in copies:
        headers = dict(copy.headers())
        original = source[(int(headers["gus.source.partition"]),
                           int(headers["gus.source.offset"]))]
        assert headers["gus.source.topic"] == topic.encode()
        assert copy.value() == original.value()
        assert headers.get("gus.source.key") == original.key()
        assert set(headers) <= {"gus.source.topic", "gus.source.partition",
                                "gus.source.offset", "gus.source.key"}, headers
        where.setdefault(copy.key(), set()).add(copy.partition())
    assert all(len(partitions) == 1 for partitions in where.values()), where


@pytest.mark.timeout(400)
def test_a_crash_mid_way_then_a_restart_loses_nothing_and_uploads_nothing_twice(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs, kafka_admin, rekeyed):
    """The first run is killed (SIGKILL, by the failpoint ``upload.mid``: a Girder item
    made, its file not uploaded) once both hops have read part of the topic; a second
    run of the group finishes: every file once, both groups at the end. In between, a
    run without the option is refused (it would read the source past the chunks left on
    the internal topic); once the group ran with it until idle, one starts."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    inner, inner_group = rekeyed(topic, group)
    files = _files(40, 31)
    _produce(tmp_path, files, topic, bootstrap)
    first = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                   collection["name"], 1, "--n_threads", "1",
                   env={"GUS_FAILPOINTS": "upload.mid=15"})
    assert first.wait(RUN_TIMEOUT) == -9, first.describe()
    plain = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                   collection["name"], 1, rekey=False)
    assert plain.wait(RUN_TIMEOUT) == 2, plain.describe()
    assert re.search(rf"re-keyed this topic by file before: \d+ chunk message\(s\) in its "
                     rf"internal topic {re.escape(inner)} are not processed yet",
                     plain.output()), plain.output()
    assert "Traceback" not in plain.output(), plain.output()
    second = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                    collection["name"], 1)
    assert second.wait(RUN_TIMEOUT) == 0, second.describe()
    after = stop_line(second.output())
    # Read again: what the first run had not committed on either hop (the first hop's
    # copies made again are duplicates, or second productions Girder skips).
    assert 0 < after["messages"] and after["failed"] == 0, after
    assert 0 < after["uploaded"] < len(files), after
    _once_and_committed(girder_client, kafka_admin, bootstrap, collection, files,
                        (topic, group), (inner, inner_group))
    # Turned off after an idle run with it: the start goes on, nothing is left to do.
    plain = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                   collection["name"], 1, rekey=False)
    assert plain.wait(RUN_TIMEOUT) == 0, plain.describe()
    assert stop_line(plain.output())["uploaded"] == 0, plain.output()


@pytest.mark.timeout(400)
def test_a_graceful_stop_mid_way_commits_both_hops_and_a_restart_finishes_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs, kafka_admin, rekeyed):
    """--max_runtime_seconds stops both hops mid-way: the first hop's copies are flushed
    and its source offsets committed at shutdown; the restart reads only what was left
    and uploads each file once (none twice, none skipped as already there)."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    inner, inner_group = rekeyed(topic, group)
    files = _files(400, 37)
    _produce(tmp_path, files, topic, bootstrap)
    first = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                   collection["name"], 1, "--max_runtime_seconds", "3", "--n_threads", "1",
                   "--max_parallel_uploads", "1")
    assert first.wait(RUN_TIMEOUT) == 0, first.describe()
    before = stop_line(first.output())
    assert before["reason"].startswith("max_runtime_seconds") and \
        0 < before["uploaded"] < len(files), before
    # What the first hop read is on the internal topic, and committed at the source.
    forwarded = sum(end_offsets(bootstrap, inner).values())
    assert sum(max(o, 0) for o in committed_offsets(kafka_admin, group, topic).values()) \
        == forwarded > 0
    second = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                    collection["name"], 1)
    assert second.wait(RUN_TIMEOUT) == 0, second.describe()
    after = stop_line(second.output())
    assert before["uploaded"] + after["uploaded"] == len(files), (before, after)
    assert after["skipped"] == 0 and after["failed"] == 0, after
    _once_and_committed(girder_client, kafka_admin, bootstrap, collection, files,
                        (topic, group), (inner, inner_group))


@pytest.mark.timeout(300)
def test_the_purge_deletes_below_the_commit_but_keeps_a_failed_files_retry_span(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs, kafka_admin, rekeyed):
    """A file Girder refuses for good (a folder holds its name) is in rule 9's retry
    spans, below the second hop's commit: the internal topic's records below the commit
    are deleted, but not that file's."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=1), make_group(), make_collection()
    inner, inner_group = rekeyed(topic, group)
    top = girder_client.createFolder(collection["_id"], collection["name"],
                                     parentType="collection")
    root = girder_client.createFolder(top["_id"], topic)
    girder_client.createFolder(root["_id"], "taken.bin")  # the file's name, as a folder
    _produce(tmp_path / "a", _files(6, 3), topic, bootstrap)
    _produce(tmp_path / "b", {"taken.bin": b"x" * (2 * CHUNK + 5)}, topic, bootstrap)
    _produce(tmp_path / "c", {f"later/{k}": v for k, v in _files(6, 4).items()}, topic,
             bootstrap)
    program = _start(stack_env, prefect_env, programs, tmp_path, topic, group,
                     collection["name"], 1)
    assert program.wait(RUN_TIMEOUT) == 0, program.describe()
    line = stop_line(program.output())
    assert line["failed"] == 1 and line["uploaded"] == 12, line
    [(offset, metadata)] = committed_with_metadata(kafka_admin, inner_group, inner).values()
    retry = parse_failed(metadata)
    assert retry, (line, metadata)
    assert offset == end_offsets(bootstrap, inner)[0], (offset, metadata)
    # The records of the 6 files before it are gone, the failed file's are kept.
    low = low_offsets(bootstrap, inner)[0]
    assert 6 * 2 <= low == retry[0][0] < offset, (low, retry, offset)


@pytest.mark.timeout(120)
def test_rekey_by_file_is_refused_with_a_kafkacrypto_config(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        kafka_admin):
    """One line, exit status 2, before anything is made: no internal topic, no commit."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    config = tmp_path / "crypto.config"
    config.write_text(f"[broker]\nbootstrap.servers = {bootstrap}\n\n"
                      "[kafkacrypto]\nnode_id = some-node\n")
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                         tmp_path / "out", group, config, 5, "--rekey_by_file")
    done = subprocess.run(argv, cwd=tmp_path, env=consumer_env(stack_env, prefect_env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    [line] = [text for text in done.stderr.splitlines() if text.startswith("error:")]
    assert "--rekey_by_file cannot be used with a KafkaCrypto config" in line, done.stderr
    assert internal_topic(topic, group) not in kafka_admin.list_topics(timeout=10).topics
    assert committed_offsets(kafka_admin, group, topic) == {}
