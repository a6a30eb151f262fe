"""The decryption rules of kafka/decrypting.py, with fake messages, keys and clock (the real
KafkaCrypto node is exercised by tests/integration/test_kafkacrypto.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from girder_upload_stream.kafka.decrypting import (NOT_DECRYPTED, NOT_ENCRYPTED, DecryptingReader,
                                             PlainMessage)
from girder_upload_stream.ledger.offsets import OffsetTracker, format_metadata, parse_spans
from girder_upload_stream.registry.recording import RegistryRecorder

TOPIC = "lab"


class Keys:
    """Which key indices this fake node has received."""

    def __init__(self) -> None:
        self.have: set[str] = set()


class FakeDecryption:
    """A message "encrypted" as ``b"enc:<key index>:<plaintext>"``; anything else is not
    a KafkaCrypto message."""

    def __init__(self, keys: Keys, key: bytes | None, value: bytes | None) -> None:
        self.keys, self.raw = keys, (key, value)
        self.size = len(key or b"") + len(value or b"")
        self.tries = 0

    def _part(self, raw: bytes | None) -> str:
        if raw is None:
            return "clear"
        if not raw.startswith(b"enc:"):
            return "never"
        return "clear" if raw.split(b":")[1].decode() in self.keys.have else "wait"

    @property
    def state(self) -> str:
        if self.size == 0 and self.raw == (None, None):
            return "wait"  # released
        states = {self._part(r) for r in self.raw}
        return "never" if "never" in states else "wait" if "wait" in states else "clear"

    def retry(self) -> str:
        self.tries += 1
        return self.state

    def never_parts(self) -> list[str]:
        return [n for n, r in zip(("key", "value"), self.raw) if self._part(r) == "never"]

    def plaintext(self):
        return tuple(None if r is None else r if not r.startswith(b"enc:")
                     else r.split(b":", 2)[2] for r in self.raw)

    def release(self) -> None:
        self.raw, self.size = (None, None), 0


class Msg:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None):
        self._p, self._o, self._k, self._v = partition, offset, key, value

    def topic(self): return TOPIC
    def partition(self): return self._p
    def offset(self): return self._o
    def key(self): return self._k
    def value(self): return self._v


class FakeBroker:
    """A consumer's commit(), remembering what it was given. An asynchronous commit is
    answered through ``answer`` at once, as the next poll would."""

    def __init__(self, answer=None) -> None:
        self.committed: dict[tuple[str, int], tuple[int, str]] = {}
        self.calls = 0
        self._answer = answer

    def commit(self, offsets, asynchronous=False):
        self.calls += 1
        for tp in offsets:  # error is None: every commit succeeds
            self.committed[(tp.topic, tp.partition)] = (tp.offset, tp.metadata)
        if asynchronous:
            self._answer(None, offsets)
            return None
        return offsets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def reader(keys: Keys, clock: Clock, **options) -> DecryptingReader:
    made = []

    def decrypt(topic, key, value):
        made.append(FakeDecryption(keys, key, value))
        return made[-1]

    result = DecryptingReader(decrypt, clock=clock, max_wait_per_decrypt=5,
                              max_initial_wait_per_decrypt=60, **options)
    result.made = made
    return result


def enc(index: str, text: bytes) -> bytes:
    return b"enc:" + index.encode() + b":" + text


def offsets(messages: list[PlainMessage]) -> list[tuple[int, int]]:
    return [(m.partition(), m.offset()) for m in messages]


def test_decrypted_messages_go_on_at_once(keys, clock):
    keys.have.add("k1")
    r = reader(keys, clock)
    out = r.take([Msg(0, 0, enc("k1", b"a_chunk_1_of_1"), enc("k1", b"VALUE"))])
    assert [(m.key(), m.value()) for m in out] == [(b"a_chunk_1_of_1", b"VALUE")]
    assert r.held == 0 and not r.waiting


def test_a_message_waits_without_blocking_and_goes_on_when_its_key_comes(keys, clock):
    keys.have.add("k1")
    r = reader(keys, clock)
    out = r.take([Msg(0, 0, enc("k2", b"late"), enc("k2", b"L")),
                  Msg(0, 1, enc("k1", b"now"), enc("k1", b"N"))])
    assert offsets(out) == [(0, 1)], "the message after the waiting one is not held back"
    assert r.waiting and r.held == 1
    clock.now += 0.2
    assert r.take([]) == [], "retried at most every half second"
    keys.have.add("k2")
    clock.now += 0.5
    out = r.take([])
    assert [(m.offset(), m.key()) for m in out] == [(0, b"late")]
    assert r.held == 0


def test_the_initial_wait_holds_until_a_first_give_up_then_the_shorter_one(keys, clock):
    r = reader(keys, clock)
    r.take([Msg(0, 0, enc("k9", b"x"), enc("k9", b"x"))])
    clock.now += 59
    r.take([Msg(0, 1, enc("k9", b"y"), enc("k9", b"y"))])
    assert r.not_decrypted == 0, "within max_initial_wait_per_decrypt"
    clock.now += 1
    r.take([])
    assert r.not_decrypted == 1, "the first one gave up after 60 s"
    clock.now += 3
    r.take([])
    assert r.not_decrypted == 1, "the second one has waited 4 s: not yet max_wait"
    clock.now += 1.01
    r.take([])
    assert r.not_decrypted == 2 and not r.waiting


def test_given_up_messages_are_registered_retried_and_cleared(tmp_path, keys, clock):
    recorder = RegistryRecorder(tmp_path, TOPIC, "g")
    r = reader(keys, clock, recorder=recorder)
    r.take([Msg(1, 7, enc("k3", b"f_chunk_1_of_1"), enc("k3", b"DATA"))])
    clock.now += 61
    r.take([])
    rows = recorder.in_progress.rows()
    assert len(rows) == 1 and rows[0].status == "failed"
    assert rows[0].extra["reason"].startswith(NOT_DECRYPTED)
    assert "left uncommitted" in rows[0].extra["reason"]
    tries = r.made[0].tries
    clock.now += 1
    r.take([])
    assert r.made[0].tries == tries, "a given-up message is retried every 5 s only"
    keys.have.add("k3")
    clock.now += 5
    out = r.take([])
    assert offsets(out) == [(1, 7)], "a key that comes late is used"
    assert recorder.in_progress.rows() == []


def test_rows_of_an_earlier_run_are_cleared_when_the_message_decrypts(tmp_path, keys, clock):
    first = RegistryRecorder(tmp_path, TOPIC, "g")
    r = reader(keys, clock, recorder=first)
    r.take([Msg(0, 3, enc("k4", b"x"), enc("k4", b"x"))])
    clock.now += 61
    r.take([])
    first.save(final=True)
    again = RegistryRecorder(tmp_path, TOPIC, "g")  # a restart reads the registry
    assert len(again.in_progress.rows()) == 1
    keys.have.add("k4")
    out = reader(keys, clock, recorder=again).take([Msg(0, 3, enc("k4", b"x"), enc("k4", b"x"))])
    assert offsets(out) == [(0, 3)]
    assert again.in_progress.rows() == []


@pytest.mark.parametrize("as_plaintext", [False, True])
def test_messages_that_are_not_kafkacrypto_messages(tmp_path, keys, clock, as_plaintext):
    recorder = RegistryRecorder(tmp_path, TOPIC, "g")
    r = reader(keys, clock, recorder=recorder, treat_undecryptable_as_plaintext=as_plaintext)
    out = r.take([Msg(0, 0, b"plain_chunk_1_of_1", b"PLAIN")])
    if as_plaintext:
        assert [(m.key(), m.value()) for m in out] == [(b"plain_chunk_1_of_1", b"PLAIN")]
        assert r.held == 0 and recorder.in_progress.rows() == []
    else:
        assert out == [] and r.held == 1 and not r.waiting, "held at once, no wait"
        (row,) = recorder.in_progress.rows()
        assert row.extra["reason"].startswith(NOT_ENCRYPTED)
        assert "--treat_undecryptable_as_plaintext" in row.extra["reason"]
        assert r.clamp({(TOPIC, 0): (1, format_metadata(1, 1, []))})[(TOPIC, 0)][0] == 0


def test_a_waiting_backlog_pauses_and_given_up_bytes_are_capped(keys, clock):
    r = reader(keys, clock, wait_bytes=100, keep_bytes=150)
    r.take([Msg(0, i, enc("k5", b"k"), enc("k5", b"v" * 50)) for i in range(3)])
    assert r.backlog_full, "3 x ~60 bytes wait: more than wait_bytes"
    clock.now += 61
    r.take([])
    assert not r.backlog_full, "given up: no longer waiting"
    kept = [d.size for d in r.made]
    assert kept[0] == 0 and all(kept[1:]), f"the oldest dropped its bytes first: {kept}"
    assert r.held == 3, "a message without bytes still holds its offset"


def test_commits_stop_before_held_messages_and_list_them_as_pending(keys, clock):
    keys.have.add("k1")
    r = reader(keys, clock)
    messages = [Msg(0, i, enc("k1" if i != 2 else "kx", b"m"), enc("k1" if i != 2 else "kx", b"v"))
                for i in range(6)]
    out = r.take(messages)
    assert [m.offset() for m in out] == [0, 1, 3, 4, 5]
    tracker = OffsetTracker()
    tracker.assigned((TOPIC, 0), None, None)
    for m in out:
        tracker.read((TOPIC, 0), m.offset())  # all done
    plan = tracker.commit_plan()
    assert plan[(TOPIC, 0)][0] == 6
    offset, metadata = r.clamp(plan)[(TOPIC, 0)]
    assert offset == 2, "the committed offset never passes a held message"
    assert parse_spans(metadata, offset) == [(2, 3)], "a restart reads it again, skips the rest"
    assert r.clamp({(TOPIC, 1): (4, "gus1:hw=4")}) == {(TOPIC, 1): (4, "gus1:hw=4")}


def test_clamp_keeps_the_spans_it_was_given(keys, clock):
    r = reader(keys, clock)
    r.take([Msg(0, 10, enc("kx", b"a"), enc("kx", b"a")), Msg(0, 30, enc("kx", b"b"), enc("kx", b"b"))])
    planned = (20, format_metadata(40, 20, [(22, 25), (29, 31)]))
    offset, metadata = r.clamp({(TOPIC, 0): planned})[(TOPIC, 0)]
    assert offset == 10
    assert parse_spans(metadata, 10) == [(10, 11), (22, 25), (29, 31)]
    held_above = r.clamp({(TOPIC, 0): (5, format_metadata(8, 5, []))})[(TOPIC, 0)]
    assert held_above == (5, format_metadata(8, 5, [])), "held offsets past N are new anyway"


def test_revoked_partitions_forget_their_held_messages(keys, clock):
    r = reader(keys, clock)
    r.take([Msg(0, 0, enc("kx", b"a"), enc("kx", b"a")), Msg(1, 0, enc("kx", b"b"), enc("kx", b"b"))])
    r.forget([(TOPIC, 0)])
    assert r.held_offsets((TOPIC, 0)) == [] and r.held_offsets((TOPIC, 1)) == [0]


def test_close_reports_what_is_left_and_stops_the_node(keys, clock, caplog):
    closed = []
    r = reader(keys, clock, on_close=lambda: closed.append(True))
    r.take([Msg(0, 4, enc("kx", b"a"), enc("kx", b"a"))])
    with caplog.at_level("WARNING", logger="girder_upload_stream.kafka.decrypting"):
        r.report_left()
    assert "1 message(s) could not be decrypted and were left uncommitted" in caplog.text
    assert "lab[0] from offset 4" in caplog.text
    r.close()
    assert closed == [True] and r.held == 0


def test_the_value_is_not_touched_while_the_key_waits(tmp_path: Path):
    """kafka_crypto.MessageDecryption looks at the (large) value only once the key no
    longer waits: same key index, and a retry of the value would copy it each time."""
    from girder_upload_stream.kafka.crypto import MessageDecryption, PartState

    class Handle:
        def __init__(self, clear): self.clear, self.asked = clear, 0
        def isCleartext(self, retry=True):
            self.asked += 1
            return self.clear[0]
        def isPossiblyDecryptable(self): return True
        def getMessage(self, retry=True): return b"plain"

    class Deserializer:
        def __init__(self): self.calls = 0
        def deserialize(self, topic, raw):
            self.calls += 1
            return Handle(flag)

    flag = [False]
    node = type("Node", (), {})()
    node.key_deserializer, node.value_deserializer = Deserializer(), Deserializer()
    decryption = MessageDecryption(node, TOPIC, b"k", b"v" * 1000)
    assert decryption.state == PartState.WAIT
    decryption.retry()
    assert node.value_deserializer.calls == 0
    flag[0] = True
    assert decryption.retry() == PartState.CLEAR
    assert node.value_deserializer.calls == 1
    assert decryption.plaintext() == (b"plain", b"plain")


def test_a_message_decrypted_late_holds_the_next_commits_until_its_file_is_done(keys, clock):
    """The checkpoint clamps the plan by the group's held messages and reports the
    clamped commits back to the offset tracker, so a message that decrypts after later
    ones were committed around it is pending below nothing the broker has: the commit
    cannot pass it before its file is done."""
    from girder_upload_stream.kafka.clients import ConsumerGroup
    from girder_upload_stream.loop.checkpoint import Checkpoint
    keys.have.add("k1")
    group = ConsumerGroup({}, TOPIC)
    group._reader = r = reader(keys, clock)
    tp = (TOPIC, 0)
    tracker = OffsetTracker()
    tracker.assigned(tp, None, None)
    index = {2: "k2"}
    out = r.take([Msg(0, i, enc(index.get(i, "k1"), b"m"), enc(index.get(i, "k1"), b"v"))
                  for i in range(6)])
    for m in out:
        tracker.read(tp, m.offset())
    broker = FakeBroker(answer=group._on_commit)
    group._consumer, group._owned = broker, {tp}
    checkpoint = Checkpoint(tracker, group)  # as the runner's
    checkpoint.commit()
    assert broker.committed[tp][0] == 2, "the broker's offset stops before the held one"
    checkpoint.commit()
    assert broker.calls == 1, "the same clamped commit is not sent again"

    keys.have.add("k2")
    clock.now += 1
    (late,) = r.take([])
    tracker.read(tp, late.offset(), "file-of-2")  # its file is not in Girder yet
    checkpoint.commit()
    offset, metadata = broker.committed[tp]
    assert offset <= 2 and (2, 3) in parse_spans(metadata, offset), (offset, metadata)
    tracker.file_done("file-of-2")
    checkpoint.commit()
    assert broker.committed[tp][0] == 6
