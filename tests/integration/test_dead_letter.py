"""The dead-letter topic on the real broker, through the real CLI (issue 20 §7).

* Every kind of rejected message (not a chunk, a huge key, the chunks of a file whose
  sha512 fails, a late chunk of that file) is read back from the dead-letter topic with
  the same key and value bytes as in the source topic and the headers that say why and
  where from; the good file lands; the group commits to the end.
* A dead-letter topic that does not exist stops the start (exit status 2, one line)
  before anything is committed.
* The source offset of a rejected message is not committed before the broker
  acknowledged its dead letter: the topic is deleted under a running consumer, a bad
  message arrives, commits stop short of it; once the topic is back, the dead letter is
  delivered and the commit passes it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import msgpack
import pytest

from girder_upload_stream import __version__
from girder_upload_stream.wire.codec import Chunk, chunk_file, encode_chunk
from tests.integration.kafka_checks import committed_offsets, end_offsets, produce_raw
from tests.integration.programs import Program, consumer_argv, consumer_env, wait_for

pytestmark = pytest.mark.integration

NOTES = Path("/work/notes/dlq-example.txt")


def _read_all(bootstrap: str, topic: str, n: int, timeout: float = 60.0) -> list:
    """Every message of ``topic`` (at least ``n``), with their headers."""
    from confluent_kafka import Consumer
    import time
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    found: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=1.0):
                assert msg.error() is None, msg.error()
                found.append(msg)
    finally:
        consumer.close()
    assert len(found) >= n, f"{len(found)} of {n} dead letters in {topic}"
    return found


def _env(stack_env) -> dict[str, str]:
    env = consumer_env(stack_env, {})
    env.pop("PREFECT_API_URL", None)  # the plain run: quicker, same code path
    return env


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap})


def _mismatched_file() -> list[tuple[bytes, bytes]]:
    """Two valid chunks of a file whose whole-file sha512 is not theirs."""
    wrong = hashlib.sha512(b"not these bytes").digest()
    out = []
    for i, piece in enumerate((b"abcd", b"efgh")):
        chunk = Chunk("forged.bin", wrong, hashlib.sha512(piece).digest(), 4 * i, i + 1, 2,
                      "sub", "", piece)
        key, value = encode_chunk(chunk)
        out.append((key.encode(), value))
    return out


def test_every_rejected_message_is_in_the_dead_letter_topic_unchanged(
        stack_env, make_topic, make_group, make_collection, tmp_path: Path) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    source, dlq, group = make_topic(partitions=2), make_topic(partitions=1), make_group()
    good = [(k.encode(), v) for k, v in map(encode_chunk, chunk_file(
        b"good bytes" * 100, filename="good.txt", chunk_size=300))]
    forged = _mismatched_file()
    bad = [(b"not-a-chunk", b"\xc1 not msgpack", 0),
           (b"K" * 200_000 + b"\n forged line", b"\x93\x01\x02\x03", 1),
           (forged[0][0], forged[0][1], 0), (forged[1][0], forged[1][1], 1)]
    where = produce_raw(bootstrap, source, [(k, v, 0) for k, v in good] + bad)
    late = produce_raw(bootstrap, source, [(forged[0][0], forged[0][1], 1)])  # after the rejection
    program = Program(consumer_argv(stack_env["GIRDER_API_URL"], source,
                                    make_collection()["name"], tmp_path / "out", group,
                                    "local", 4, "--dead_letter_topic", dlq),
                      tmp_path / "run.log", tmp_path, env=_env(stack_env))
    assert program.wait(180) == 0, program.describe()
    assert f"rejected messages go to the dead-letter topic {dlq}" in program.output()

    letters = _read_all(bootstrap, dlq, 5)
    by_origin = {(int(h["gus.errors.partition"]), int(h["gus.errors.offset"])): (m, h)
                 for m in letters for h in [{k: v.decode() for k, v in m.headers()}]}
    expected = {where[len(good) + i]: (key, value) for i, (key, value, _) in enumerate(bad)}
    expected[late[0]] = forged[0]
    assert set(by_origin) == set(expected), (set(by_origin), set(expected))
    for origin, (key, value) in expected.items():
        msg, headers = by_origin[origin]
        assert (msg.key(), msg.value()) == (key, value), origin  # unchanged bytes
        assert headers["gus.errors.topic"] == source
        assert headers["gus.errors.consumer.group"] == group
        assert headers["gus.version"] == __version__
        assert headers["gus.errors.reason"] and "\n" not in headers["gus.errors.reason"]
    kinds = sorted(h["gus.errors.kind"] for _, h in by_origin.values())
    assert kinds == ["chunk_rejected", "file_rejected", "file_rejected", "message_rejected",
                     "message_rejected"]
    assert any("hash" in h["gus.errors.reason"] for _, h in by_origin.values())
    for origin in (where[len(good) + 2], where[len(good) + 3], late[0]):  # in any order
        assert by_origin[origin][1].get("gus.errors.file") == "sub/forged.bin", origin
    assert committed_offsets(_admin(bootstrap), group, source) == end_offsets(bootstrap, source)
    msg, headers = by_origin[where[len(good)]]
    NOTES.parent.mkdir(parents=True, exist_ok=True)
    NOTES.write_text(
        "A dead letter read back from the real broker (tests/integration/test_dead_letter.py::"
        "test_every_rejected_message_is_in_the_dead_letter_topic_unchanged):\n"
        f"dead-letter topic {msg.topic()} partition {msg.partition()} offset {msg.offset()}\n"
        f"key   {msg.key()!r}\nvalue {msg.value()!r}\nheaders:\n"
        + "".join(f"  {name}: {value}\n" for name, value in headers.items()))


def test_a_missing_dead_letter_topic_stops_the_start(stack_env, make_topic, make_group,
                                                     make_collection, tmp_path: Path) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    source, group = make_topic(partitions=1), make_group()
    produce_raw(bootstrap, source, [(b"junk", b"\xc1", 0)])
    missing = f"{source}-no-such-dlq"
    result = subprocess.run(consumer_argv(stack_env["GIRDER_API_URL"], source,
                                          make_collection()["name"], tmp_path / "out", group,
                                          "local", 4, "--dead_letter_topic", missing),
                            env=_env(stack_env), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: cannot start: the dead-letter topic '{missing}' cannot be used" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert committed_offsets(_admin(bootstrap), group, source).get(0, -1) < 0  # nothing
    assert missing not in _admin(bootstrap).list_topics(timeout=10).topics  # not created


def test_no_commit_passes_a_rejected_message_before_its_dead_letter_is_acknowledged(
        stack_env, make_topic, make_group, make_collection, kafka_admin,
        tmp_path: Path) -> None:
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    source, dlq, group = make_topic(partitions=1), make_topic(partitions=1), make_group()
    good = [(k.encode(), v, 0) for k, v in map(encode_chunk, chunk_file(
        b"first", filename="first.txt", chunk_size=100))]
    produce_raw(bootstrap, source, good)
    program = Program(consumer_argv(stack_env["GIRDER_API_URL"], source,
                                    make_collection()["name"], tmp_path / "out", group,
                                    "local", 600, "--dead_letter_topic", dlq),
                      tmp_path / "run.log", tmp_path, env=_env(stack_env))
    try:
        admin = _admin(bootstrap)
        wait_for(lambda: committed_offsets(admin, group, source).get(0) == 1,
                 "the good file's commit", program)
        for future in kafka_admin.delete_topics([dlq], operation_timeout=30).values():
            future.result(timeout=60)
        wait_for(lambda: dlq not in kafka_admin.list_topics(timeout=10).topics,
                 "the dead-letter topic's deletion", program)
        ((_, bad_offset),) = produce_raw(bootstrap, source, [(b"junk", b"\xc1 junk", 0)])
        ((_, after),) = produce_raw(bootstrap, source, good[:1])  # a file after it
        wait_for(lambda: "not yet acknowledged by the dead-letter topic" in program.output(),
                 "the consumer to wait for the dead letter", program)
        assert committed_offsets(admin, group, source)[0] <= bad_offset
        from confluent_kafka.admin import NewTopic
        kafka_admin.create_topics([NewTopic(dlq, 1, 1)])[dlq].result(timeout=60)
        wait_for(lambda: committed_offsets(admin, group, source).get(0) == after + 1,
                 "the commit past the rejected message once its dead letter is in",
                 program, timeout=120)
        (letter,) = _read_all(bootstrap, dlq, 1)
        assert (letter.key(), letter.value()) == (b"junk", b"\xc1 junk")
        assert dict(letter.headers())["gus.errors.offset"] == str(bad_offset).encode()
    finally:
        assert program.stop() == 0, program.describe()
