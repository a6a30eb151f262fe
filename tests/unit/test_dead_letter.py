"""The dead-letter sink (issue 20 §7), pure: a fake producer and fetch stand in for
Kafka (tests/integration/test_dead_letter.py uses the real broker). Checked: rejected
messages leave unchanged with their headers; settle() is True only once every one is
acknowledged; failures are sent again; a rejected file's messages are read again by
offset; the processor reports every kind of rejection; and no commit happens while a
dead letter is not acknowledged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from girder_upload_stream import __version__
from girder_upload_stream.shared_types import RawMessage
from girder_upload_stream.loop import dead_letter
from girder_upload_stream.loop.dead_letter import HEADERS, DeadLetters
from girder_upload_stream.ledger.offsets import OffsetTracker
from girder_upload_stream.loop.checkpoint import Checkpoint
from girder_upload_stream.registry.recording import RegistryRecorder
from girder_upload_stream.wire.codec import Chunk, encode_chunk
from tests.unit.fakes import TOPIC, Log, make_processor


class FakeProducer:
    """Records what is sent; answers on flush with ``answers`` (None: acknowledged,
    a string: an error, ``"hold"``: no answer yet)."""

    topic = "dlq"

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes | None, bytes | None, dict[str, str]]] = []
        self.answers: list[str | None] = []
        self._unanswered: list = []
        self.closed = False

    def send(self, token, key, value, headers, on_delivered) -> None:
        self.sent.append((token, key, value, {k: v.decode() for k, v in headers}))
        self._unanswered.append((token, on_delivered))

    def flush(self, timeout: float) -> int:
        left = []
        for token, callback in self._unanswered:
            answer = self.answers.pop(0) if self.answers else None
            if answer == "hold":
                left.append((token, callback))
            else:
                callback(token, answer)
        self._unanswered = left
        return len(left)

    def close(self) -> None:
        self.closed = True


class FakeFetch:
    def __init__(self, topic: dict[tuple[str, int, int], tuple[bytes, bytes]]) -> None:
        self.topic, self.calls = topic, []

    def __call__(self, wanted, timeout):
        self.calls.append({tp: set(o) for tp, o in wanted.items()})
        return {k: v for k, v in self.topic.items() if k[2] in wanted.get(k[:2], ())}


def _letters(fetch=None) -> tuple[DeadLetters, FakeProducer]:
    producer = FakeProducer()
    return DeadLetters(producer, fetch or FakeFetch({}), "grp"), producer


def test_a_rejected_message_goes_out_unchanged_with_its_headers() -> None:
    letters, producer = _letters()
    letters.message("src", 3, 17, b"\x00key\xff", b"\xc1value", "not msgpack",
                    "message_rejected", "a/b.txt")
    assert letters.pending == 1
    assert letters.settle() is True
    ((_, key, value, headers),) = producer.sent
    assert (key, value) == (b"\x00key\xff", b"\xc1value")
    assert headers == {HEADERS["reason"]: "not msgpack", HEADERS["kind"]: "message_rejected",
                       HEADERS["topic"]: "src", HEADERS["partition"]: "3",
                       HEADERS["offset"]: "17", HEADERS["group"]: "grp",
                       HEADERS["version"]: __version__, HEADERS["file"]: "a/b.txt"}
    assert letters.pending == 0 and letters.sent == 1


def test_nothing_rejected_settles_at_once_without_sending() -> None:
    letters, producer = _letters()
    assert letters.settle() is True and producer.sent == []


def test_a_message_the_broker_refuses_is_sent_again_and_holds_the_commit(caplog) -> None:
    letters, producer = _letters()
    letters.message("src", 0, 1, b"k", b"v", "bad", "message_rejected")
    producer.answers = ["Broker: Unknown topic or partition"]
    assert letters.settle() is False and letters.pending == 1
    assert "offset commits wait" in caplog.text
    assert letters.settle() is True
    assert [s[1:3] for s in producer.sent] == [(b"k", b"v"), (b"k", b"v")]
    assert "offset commits resume" in caplog.text


def test_a_message_without_an_answer_yet_is_not_sent_twice() -> None:
    letters, producer = _letters()
    letters.message("src", 0, 1, b"k", b"v", "bad", "message_rejected")
    producer.answers = ["hold"]
    assert letters.settle() is False
    assert letters.settle() is True  # answered at the next flush
    assert len(producer.sent) == 1


def test_a_rejected_files_messages_are_read_again_by_offset() -> None:
    fetch = FakeFetch({("src", 0, 4): (b"k4", b"v4"), ("src", 1, 9): (b"k9", b"v9"),
                       ("src", 0, 5): (b"other", b"not wanted")})
    letters, producer = _letters(fetch)
    letters.offsets([(("src", 0), 4), (("src", 1), 9)], "sha512 mismatch", "file_rejected",
                    "f.bin")
    assert letters.settle() is True
    assert fetch.calls == [{("src", 0): {4}, ("src", 1): {9}}]
    assert sorted(s[1:3] for s in producer.sent) == [(b"k4", b"v4"), (b"k9", b"v9")]
    assert {s[3][HEADERS["kind"]] for s in producer.sent} == {"file_rejected"}


def test_a_message_gone_from_the_topic_is_given_up_after_some_attempts(caplog) -> None:
    letters, producer = _letters(FakeFetch({}))
    letters.offsets([(("src", 0), 4)], "sha512 mismatch", "file_rejected")
    for _ in range(dead_letter.FETCH_ATTEMPTS - 1):
        assert letters.settle() is False
    assert letters.settle() is True and producer.sent == []
    assert "could not be read again" in caplog.text


def test_beyond_the_held_bytes_only_offsets_are_kept(monkeypatch) -> None:
    monkeypatch.setattr(dead_letter, "HELD_BYTES", 10)
    fetch = FakeFetch({("src", 0, 2): (b"k2", b"0123456789")})
    letters, producer = _letters(fetch)
    letters.message("src", 0, 1, b"k1", b"v1", "bad", "message_rejected")  # held
    letters.message("src", 0, 2, b"k2", b"0123456789", "bad", "message_rejected")  # not
    assert letters.settle() is True
    assert fetch.calls == [{("src", 0): {2}}]
    assert sorted(s[1:3] for s in producer.sent) == [(b"k1", b"v1"), (b"k2", b"0123456789")]


def test_headers_carry_bounded_one_line_text() -> None:
    letters, producer = _letters()
    letters.message("src", 0, 1, b"k", b"v", "bad\nFORGED" + "x" * 100_000,
                    "message_rejected", "n\n" + "y" * 100_000)
    letters.settle()
    headers = producer.sent[0][3]
    assert "\n" not in headers[HEADERS["reason"]] and len(headers[HEADERS["reason"]]) < 1100
    assert len(headers[HEADERS["file"]]) < 600


def test_the_final_tick_closes_the_producer() -> None:
    letters, producer = _letters()
    letters.tick(None)
    assert not producer.closed
    letters.tick(None, final=True)
    assert producer.closed


# ---------------------------------------------------------------- the commit order

class SaveSpy:
    def __init__(self) -> None:
        self.saves = 0

    def try_save(self) -> bool:
        self.saves += 1
        return True


def test_no_registry_save_or_commit_while_a_dead_letter_is_not_acknowledged() -> None:
    letters, producer = _letters()
    recorder = SaveSpy()
    tracker = OffsetTracker()
    tracker.read(("src", 0), 1)  # the rejected message, done once recorded
    group = _CommitSpy()
    checkpoint = Checkpoint(tracker, group, dead_letters=letters.settle,
                            save=recorder.try_save)
    letters.message("src", 0, 1, b"k", b"v", "bad", "message_rejected")
    producer.answers = ["Local: Message timed out"]
    checkpoint.commit()
    assert recorder.saves == 0 and group.commits == []
    checkpoint.commit()
    assert recorder.saves == 1 and [{tp: o for tp, (o, _) in c.items()}
                                    for c in group.commits] == [{("src", 0): 2}]


class _CommitSpy:
    assignment = [("src", 0)]

    def __init__(self) -> None:
        self.commits: list = []

    def commit(self, offsets):
        self.commits.append(dict(offsets))
        return offsets


def test_a_runner_commits_nothing_while_the_dead_letter_topic_refuses(tmp_path: Path) -> None:
    from girder_upload_stream.loop.runner import StreamRunner
    from girder_upload_stream.settings import RunSettings

    class Group:
        assignment = [(TOPIC, 0)]
        commits: list = []

        def commit(self, offsets):
            self.commits.append(dict(offsets))
            return offsets

    letters, producer = _letters()
    recorder = RegistryRecorder(tmp_path, TOPIC, "grp")
    recorder.dead_letters = letters
    proc = make_processor(recorder=recorder)
    runner = StreamRunner(RunSettings(), proc, Group(), submit=lambda unit: None,
                          save=recorder.try_save, dead_letters=letters.settle)
    proc.handle(RawMessage(TOPIC, 0, 0, b"k", b"\xc1 not msgpack"))
    producer.answers = ["Broker: Topic authorization failed"]
    runner.commit()
    assert Group.commits == []
    runner.commit()
    assert Group.commits == [{(TOPIC, 0): Group.commits[0][(TOPIC, 0)]}]
    assert producer.sent[-1][1:3] == (b"k", b"\xc1 not msgpack")


# ---------------------------------------------------------------- every rejection

def _sha(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def test_the_processor_reports_every_kind_of_rejection(tmp_path: Path) -> None:
    fetched: dict = {}
    letters, producer = _letters(FakeFetch(fetched))
    recorder = RegistryRecorder(tmp_path, TOPIC, "grp")
    recorder.dead_letters = letters
    proc = make_processor(recorder=recorder)
    log = Log()
    # 1. not a chunk
    proc.handle(log.put(0, b"junk-key", b"\xc1"))
    # 2. a file that can never be written (its path is the consumer's own folder): both
    # its messages
    whole = _sha(b"abcdefgh")
    msgs = [log.put(i, *encode_chunk(Chunk("m.bin", whole, _sha(p), 4 * i, i + 1, 2,
                                           ".gus-staging", "", p)))
            for i, p in enumerate((b"abcd", b"efgh"))]
    for msg in msgs:
        fetched[(msg.topic, msg.partition, msg.offset)] = (msg.key, msg.value)
        proc.handle(msg)
    # 2b. a file whose sha512 fails: both its messages (the next run reads them again,
    # as the reason says: another copy may verify)
    wrong = _sha(b"something else")
    failed = [log.put(i, *encode_chunk(Chunk("n.bin", wrong, _sha(p), 4 * i, i + 1, 2, "",
                                             "", p)))
              for i, p in enumerate((b"abcd", b"efgh"))]
    for msg in failed:
        fetched[(msg.topic, msg.partition, msg.offset)] = (msg.key, msg.value)
        proc.handle(msg)
    # 3. a late chunk of the rejected file
    late = log.put(2, msgs[0].key, msgs[0].value)
    proc.handle(late)
    # 4. an undecryptable message is not rejected: no dead letter
    from girder_upload_stream.kafka.decrypting import UndecryptedMessageError
    recorder.message_rejected(RawMessage(TOPIC, 3, 0, None, None),
                              UndecryptedMessageError("not decrypted"))
    assert letters.settle() is True
    got = {(s[3][HEADERS["kind"]], int(s[3][HEADERS["partition"]]),
            int(s[3][HEADERS["offset"]])): s[1:3] for s in producer.sent}
    assert got == {("message_rejected", 0, 0): (b"junk-key", b"\xc1"),
                   ("file_rejected", msgs[0].partition, msgs[0].offset):
                       (msgs[0].key, msgs[0].value),
                   # the path rejects the file at its first chunk: the next one is
                   # a chunk of a rejected file
                   ("chunk_rejected", msgs[1].partition, msgs[1].offset):
                       (msgs[1].key, msgs[1].value),
                   ("chunk_rejected", late.partition, late.offset): (late.key, late.value),
                   **{("file_rejected", m.partition, m.offset): (m.key, m.value)
                      for m in failed}}
    assert len(producer.sent) == 6
    assert all("read again by the next run" in s[3][HEADERS["reason"]]
               for s in producer.sent if s[1] in {m.key for m in failed})


# ---------------------------------------------------------------- settings

def test_the_topic_comes_from_the_option_else_the_config_files_section(tmp_path) -> None:
    from girder_upload_stream.loop.wiring import dead_letter_settings
    path = tmp_path / "c.config"
    path.write_text("[broker]\nbootstrap.servers = b:9092\n\n[dead_letter]\ntopic = from-file\n"
                    "linger.ms = 7\n")
    topic, settings = dead_letter_settings(str(path), None)
    assert topic == "from-file"
    assert settings == {"bootstrap.servers": "b:9092", "linger.ms": "7"}  # no "topic" key
    assert dead_letter_settings(str(path), "from-option")[0] == "from-option"
    plain = tmp_path / "plain.config"
    plain.write_text("[broker]\nbootstrap.servers = b:9092\n")
    assert dead_letter_settings(str(plain), None) is None
    assert dead_letter_settings(str(plain), "t") == ("t", {"bootstrap.servers": "b:9092"})


def test_the_option_is_a_flow_parameter_and_a_cli_option() -> None:
    import inspect
    from flows.upload_stream import upload_stream
    from girder_upload_stream.options import DEFAULTS, OPTIONS
    assert any(o.name == "dead_letter_topic" and o.cli and o.flow for o in OPTIONS)
    signature = inspect.signature(upload_stream.fn)
    assert signature.parameters["dead_letter_topic"].default is DEFAULTS.dead_letter_topic
