"""Unit tests for the runner's side jobs: the console, heartbeats and the registry
recorder (girder_upload_stream.loop.console, .heartbeat, .recording)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest

from girder_upload_stream.loop import console as console_module
from girder_upload_stream.loop import heartbeat as heartbeat_module
from girder_upload_stream.registry import tables as R
from girder_upload_stream.wire.codec import chunk_file
from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.loop.heartbeat import Heartbeats, heartbeat_value
from girder_upload_stream.ledger.processor import Counters
from girder_upload_stream.shared_types import (CompletedFile, FileOutcome, Outcome, RawMessage,
                                               RejectedFile)
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.assembly.reassembly import Reassembler
from girder_upload_stream.registry.recording import RegistryRecorder, RegistrySaver
from girder_upload_stream.loop.runner import StopSignal
from tests.unit.fakes import Clock


def fake_runner(**counts) -> SimpleNamespace:
    processor = SimpleNamespace(counters=Counters(**counts), reassembler=Reassembler())
    return SimpleNamespace(processor=processor)


def wait_for(condition, timeout: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class TrackedInput(io.StringIO):
    """stdin whose end (EOF) the test can wait for."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.exhausted = threading.Event()

    def __next__(self) -> str:
        try:
            return super().__next__()
        except StopIteration:
            self.exhausted.set()
            raise


class BrokenInput(io.StringIO):
    """stdin that fails when read (closed under our feet, or an OS error)."""

    def __init__(self, error: Exception) -> None:
        super().__init__("")
        self.error = error
        self.tried = threading.Event()

    def __iter__(self):
        self.tried.set()
        raise self.error


# ---------------------------------------------------------------- console


@pytest.mark.parametrize("command", ["q", "quit", "  QUIT  ", "Q"])
def test_console_quit_requests_stop(command) -> None:
    stop = StopSignal()
    console_module.Console(3600, stdin=io.StringIO(f"{command}\n"), stdout=io.StringIO(),
                           stop=stop)
    assert wait_for(stop.is_set) and stop.reason == "quit typed on the console"


@pytest.mark.parametrize("command", ["c", "check", " Check "])
def test_console_check_prints_counts_once(command) -> None:
    out = io.StringIO()
    stdin = TrackedInput(f"{command}\n")
    stop = StopSignal()
    console = console_module.Console(3600, stdin=stdin, stdout=out, stop=stop)
    assert stdin.exhausted.wait(0.2)
    runner = fake_runner(messages_read=7, bytes_read=12345, files_uploaded=2,
                         files_skipped=1, files_failed=3, messages_rejected=4)
    console.tick(runner)
    text = out.getvalue()
    assert "7 messages read (12,345 bytes)" in text
    assert "2 files uploaded, 1 already in Girder, 3 failed, 4 messages rejected" in text
    assert "0 file(s) in progress" in text
    console.tick(runner)
    assert out.getvalue() == text  # printed once per request
    assert not stop.is_set()


def test_console_final_tick_always_prints_counts() -> None:
    out = io.StringIO()
    console = console_module.Console(3600, interactive=False, stdout=out)
    console.tick(fake_runner(messages_read=1))
    assert out.getvalue() == ""
    console.tick(fake_runner(messages_read=1), final=True)
    assert out.getvalue().startswith("1 messages read")


def test_console_ignores_eof_and_other_lines() -> None:
    stdin = TrackedInput("hello\n\nqq\ncheckk\n")
    out = io.StringIO()
    stop = StopSignal()
    console = console_module.Console(3600, stdin=stdin, stdout=out, stop=stop)
    assert stdin.exhausted.wait(0.2)
    time.sleep(0.01)
    assert not stop.is_set()
    console.tick(fake_runner())
    assert out.getvalue() == ""


def test_console_closed_stdin_no_thread_no_stop() -> None:
    stdin = io.StringIO("q\n")
    stdin.close()
    before = threading.active_count()
    stop = StopSignal()
    console_module.Console(3600, stdin=stdin, stdout=io.StringIO(), stop=stop)
    assert threading.active_count() == before
    assert not stop.is_set()


@pytest.mark.parametrize("error", [ValueError("I/O operation on closed file"),
                                   OSError("bad fd")])
def test_console_unreadable_stdin_is_ignored(error) -> None:
    stdin = BrokenInput(error)
    stop = StopSignal()
    console_module.Console(3600, stdin=stdin, stdout=io.StringIO(), stop=stop)
    assert stdin.tried.wait(0.2)
    time.sleep(0.01)
    assert not stop.is_set()


def test_console_not_interactive_reads_nothing() -> None:
    stdin = TrackedInput("q\n")
    stop = StopSignal()
    console_module.Console(3600, interactive=False, stdin=stdin, stdout=io.StringIO(),
                           stop=stop)
    assert not stdin.exhausted.wait(0.05)
    assert not stop.is_set()


def test_console_prints_a_dot_every_update_seconds(monkeypatch) -> None:
    clock = Clock(50.0)
    monkeypatch.setattr(console_module, "time", SimpleNamespace(monotonic=clock))
    out = io.StringIO()
    console = console_module.Console(10, interactive=False, stdout=out)
    runner = fake_runner()
    for _ in range(36):  # t = 50 .. 85
        console.tick(runner)
        clock.now += 1
    assert out.getvalue() == ".\n" * 3


def test_console_survives_a_closed_stdout() -> None:
    out = io.StringIO()
    out.close()
    console = console_module.Console(0, interactive=False, stdout=out)
    console.tick(fake_runner(), final=True)  # no exception


# ---------------------------------------------------------------- heartbeats


def test_heartbeat_value_has_exactly_the_openmsistream_fields() -> None:
    delta = {"messages_read": 5, "bytes_read": 500, "messages_processed": 4,
             "bytes_processed": 400, "files_uploaded": 9}
    value = json.loads(heartbeat_value(delta, datetime(2024, 3, 5, 7, 8, 9, 123,
                                                       tzinfo=timezone.utc)))
    assert value == {"timestamp": "2024-03-05T07:08:09.000123+00:00", "n_messages_read": 5,
                     "n_bytes_read": 500, "n_messages_processed": 4,
                     "n_bytes_processed": 400}


def test_heartbeat_value_defaults_to_zero_and_now() -> None:
    value = json.loads(heartbeat_value({}))
    assert set(value) == {"timestamp", "n_messages_read", "n_bytes_read",
                          "n_messages_processed", "n_bytes_processed"}
    assert all(value[k] == 0 for k in value if k != "timestamp")
    stamp = datetime.fromisoformat(value["timestamp"])
    # UTC with its offset, as OpenMSIStream 1.8.8's HeartbeatProducible writes it.
    assert value["timestamp"].endswith("+00:00")
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 5


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.closed = False

    def send(self, value: str) -> None:
        self.sent.append(json.loads(value))

    def close(self) -> None:
        self.closed = True


def test_heartbeats_send_deltas_every_interval_and_at_the_end(monkeypatch) -> None:
    clock = Clock(50.0)
    monkeypatch.setattr(heartbeat_module, "time", SimpleNamespace(monotonic=clock))
    producer = FakeProducer()
    beats = Heartbeats(producer, interval=30)
    runner = fake_runner()
    c = runner.processor.counters
    c.messages_read, c.bytes_read = 10, 1000
    clock.now += 29
    beats.tick(runner)
    assert producer.sent == []
    clock.now += 1
    beats.tick(runner)
    c.messages_read, c.bytes_read = 15, 1600
    c.messages_processed, c.bytes_processed = 12, 1200
    clock.now += 10
    beats.tick(runner)  # too early
    clock.now += 20
    beats.tick(runner)
    c.messages_read += 1
    beats.tick(runner, final=True)
    strip = [{k: v for k, v in s.items() if k != "timestamp"} for s in producer.sent]
    assert strip == [
        {"n_messages_read": 10, "n_bytes_read": 1000, "n_messages_processed": 0,
         "n_bytes_processed": 0},
        {"n_messages_read": 5, "n_bytes_read": 600, "n_messages_processed": 12,
         "n_bytes_processed": 1200},
        {"n_messages_read": 1, "n_bytes_read": 0, "n_messages_processed": 0,
         "n_bytes_processed": 0},
    ]
    assert producer.closed


# ---------------------------------------------------------------- registry recorder

TOPIC, GROUP = "topic", "group"


def chunks(data: bytes, name: str, subdir: str = "", size: int = 4):
    return list(chunk_file(data, subdir, size, filename=name))


def completed(data: bytes, rel: str, n_chunks: int = 1) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(),
                         hashlib.sha256(data).hexdigest(), len(data), n_chunks,
                         1_700_000_000.0, 1_700_000_005.0, 0.0, Pieces([data]), None)


def gen(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()[:32]


def key(rel: str, data: bytes) -> R.RowKey:
    return R.RowKey(PurePosixPath(rel), gen(data))


@pytest.fixture
def recorder(tmp_path) -> RegistryRecorder:
    return RegistryRecorder(tmp_path / "LOGS", TOPIC, GROUP)


def test_recorder_tracks_files_in_progress(recorder) -> None:
    data = b"0123456789"
    c1, c2, _ = chunks(data, "f.bin", "sub")
    recorder.chunk_added(c1, 0, 1)
    row = recorder.in_progress.get(key("sub/f.bin", data))
    assert row is not None
    assert (row.filename, str(row.rel_filepath), row.status, row.n_chunks) == \
        ("f.bin", "sub/f.bin", R.STATUS_IN_PROGRESS, 3)
    first = row.first_message
    recorder.chunk_added(c2, 0, 2)
    assert len(recorder.in_progress) == 1
    assert recorder.in_progress.get(key("sub/f.bin", data)).first_message == first


def test_recorder_moves_processed_files_and_counts_each_time(recorder, tmp_path) -> None:
    data = b"processed twice"
    [c] = chunks(data, "p.txt", size=100)
    recorder.chunk_added(c, 0, 1)
    done = completed(data, "p.txt")
    recorder.file_outcome(done, FileOutcome("p.txt", ("p.txt", done.file_hash),
                                            Outcome.UPLOADED, item_id="abc"))
    assert recorder.in_progress.get(key("p.txt", data)) is None
    recorder.file_outcome(done, FileOutcome("p.txt", ("p.txt", done.file_hash),
                                            Outcome.SKIPPED_IDENTICAL))
    rows = recorder.processed.rows()
    assert [str(r.rel_filepath) for r in rows] == ["p.txt", "p.txt"]
    assert [r.extra["outcome"] for r in rows] == ["uploaded", "skipped_identical"]
    assert rows[0].extra["item_id"] == "abc" and rows[0].extra["sha256"] == done.sha256
    assert rows[0].generation == gen(data)
    recorder.save(final=True)
    on_disk = R.read_processed(tmp_path / "LOGS", TOPIC, GROUP).rows
    assert [str(r.rel_filepath) for r in on_disk] == ["p.txt", "p.txt"]
    assert R.load_processed_keys(tmp_path / "LOGS", TOPIC, GROUP) == {key("p.txt", data)}
    assert R.processed_path(tmp_path / "LOGS", TOPIC, GROUP).is_file()


@pytest.mark.parametrize("outcome", [Outcome.FAILED_TRANSIENT, Outcome.FAILED_TERMINAL])
def test_recorder_marks_failed_uploads_with_reason(recorder, outcome) -> None:
    data = b"nope"
    done = completed(data, "d/x.bin", n_chunks=2)
    recorder.file_outcome(done, FileOutcome("d/x.bin", ("d/x.bin", done.file_hash),
                                            outcome, "HTTP 503"))
    row = recorder.in_progress.get(key("d/x.bin", data))
    assert row.status == R.STATUS_FAILED and row.n_chunks == 2
    assert row.extra == {"reason": f"{outcome.value}: HTTP 503"}
    assert recorder.processed.rows() == []


def test_recorder_marks_rejected_files(recorder) -> None:
    h = hashlib.sha512(b"whatever").digest()
    recorder.file_rejected(RejectedFile("a/bad.bin", h, "mismatched hash: sha512 differs",
                                        2, 2, 1_700_000_000.0, 1_700_000_001.0))
    recorder.file_rejected(RejectedFile("a/worse.bin", h, "chunk 2 overlaps chunk 1",
                                        1, 3, 1_700_000_000.0, 1_700_000_001.0))
    rows = {str(r.rel_filepath): r for r in recorder.in_progress.rows()}
    assert rows["a/bad.bin"].status == R.STATUS_MISMATCHED_HASH
    assert rows["a/worse.bin"].status == R.STATUS_FAILED
    assert rows["a/worse.bin"].extra == {"reason": "chunk 2 overlaps chunk 1"}
    assert rows["a/worse.bin"].generation == h.hex()[:32]


def test_recorder_marks_rejected_messages(recorder) -> None:
    msg = RawMessage("topic", 3, 42, b"k", b"junk")
    recorder.message_rejected(msg, ChunkDecodeError("message value is not msgpack"))
    recorder.message_rejected(RawMessage("topic", 1, 7, None, None),
                              ChunkDecodeError("unsafe path", rel_path="../x"))
    rows = recorder.in_progress.rows()
    assert len(rows) == 2
    first = rows[0]
    assert first.status == R.STATUS_FAILED
    assert str(first.rel_filepath) == "message topic[3]@42"
    assert first.generation == "offset-3-42"
    assert first.extra == {"reason": "message value is not msgpack", "partition": 3,
                           "offset": 42}
    assert rows[1].extra["reason"] == "unsafe path"


WEIRD = ["semi;colon.txt", 'dq"uote.txt', "new\nline.txt", "tab\tx", " lead space ",
         "ünï–cødé 日本.bin", "back\\slash", "x" * 200]


@pytest.mark.parametrize("name", WEIRD)
def test_recorder_survives_weird_names(recorder, tmp_path, name) -> None:
    data = name.encode()
    done = completed(data, f"w/{name}")
    recorder.file_outcome(done, FileOutcome(done.rel_path, (done.rel_path, done.file_hash),
                                            Outcome.UPLOADED))
    recorder.message_rejected(RawMessage("topic", 0, 1, None, None),
                              ChunkDecodeError("bad", rel_path=name))
    recorder.save(final=True)
    rows = R.read_processed(tmp_path / "LOGS", TOPIC, GROUP).rows
    assert [r.filename for r in rows] == [name]
    reloaded = R.InProgressTable.open(tmp_path / "LOGS", TOPIC, GROUP).rows()
    assert [r.extra["reason"] for r in reloaded] == ["bad"]


@pytest.mark.parametrize("rel_path", ["", ".", "..", "/"])
def test_recorder_never_raises_on_unusable_names(recorder, rel_path) -> None:
    recorder.message_rejected(RawMessage("topic", 0, 9, None, None),
                              ChunkDecodeError("bad", rel_path=rel_path))
    recorder.save(final=True)  # whatever it recorded, the tables still save


def test_registry_saver_saves_every_interval_and_at_the_end(recorder, tmp_path,
                                                            monkeypatch) -> None:
    import girder_upload_stream.registry.recording as recording_module
    clock = Clock(50.0)
    monkeypatch.setattr(recording_module, "time", SimpleNamespace(monotonic=clock))
    saver = RegistrySaver(recorder, interval=2.0)
    [c] = chunks(b"abcdefgh", "s.bin", size=4)[:1]
    recorder.chunk_added(c, 0, 1)
    table = R.in_progress_path(tmp_path / "LOGS", TOPIC, GROUP)
    saver.tick(None)
    assert not table.exists()
    clock.now += 2
    saver.tick(None)
    assert table.exists()
    done = completed(b"abcdefgh", "s.bin", 2)
    recorder.file_outcome(done, FileOutcome("s.bin", ("s.bin", done.file_hash),
                                            Outcome.UPLOADED))
    saver.tick(None, final=True)
    assert R.InProgressTable.open(tmp_path / "LOGS", TOPIC, GROUP).rows() == []
    assert [str(r.rel_filepath) for r in
            R.read_processed(tmp_path / "LOGS", TOPIC, GROUP).rows] == ["s.bin"]


def test_registry_saver_survives_a_failing_disk(recorder, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder.in_progress, "save", full)
    RegistrySaver(recorder, interval=0).tick(None, final=True)  # logged, not raised


def test_recorder_reads_back_earlier_state(tmp_path) -> None:
    folder = tmp_path / "LOGS"
    first = RegistryRecorder(folder, TOPIC, GROUP)
    [c] = chunks(b"zz", "z.bin", size=1)[:1]
    first.chunk_added(c, 0, 1)
    first.save(final=True)
    second = RegistryRecorder(folder, TOPIC, GROUP)
    assert [str(r.rel_filepath) for r in second.in_progress.rows()] == ["z.bin"]
