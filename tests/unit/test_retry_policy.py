"""The one upload path (issue 22 §2): the retry policy (its delays, its cap, failures
classified by class), Girder's answers turned into those classes, the ledger retrying
a file by the policy on a fake clock, and the executor interface both ways fill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from girder_client import HttpError

from girder_upload_stream.errors import StorageError
from girder_upload_stream.girder.errors import (GirderAuthError, GirderNameTakenError,
                                                GirderRootFolderGone, GirderTerminalError,
                                                GirderTransientError, GirderUnknownIdError,
                                                GirderUnreachableError, translate)
from girder_upload_stream.ledger.records import FileState
from girder_upload_stream.shared_types import FileOutcome, Outcome
from girder_upload_stream.loop.executor import BODIES, Job, ThreadUploads, UploadExecutor
from girder_upload_stream.retry_policy import Failure, RetryPolicy, classify
from tests.unit.fakes import TOPIC, Clock, Log, make_processor, one_chunk, outcomes
from tests.unit.test_upload_task import FakeStore, _unit

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the schedule


def test_the_listed_delays_come_first_then_each_wait_doubles_up_to_the_cap():
    policy = RetryPolicy((2, 10, 30), 300)
    assert policy.schedule(9) == [2, 10, 30, 60, 120, 240, 300, 300, 300]
    assert policy.delay(10_000) == 300  # no overflow however long the outage


def test_the_production_policy_is_the_documented_one():
    assert RetryPolicy() == RetryPolicy((2.0, 10.0, 30.0), 300.0)
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "60, 120, 240,\n300, 300... s" in text or "60, 120, 240, 300, 300... s" in text
    assert RetryPolicy().schedule(8)[3:] == [60, 120, 240, 300, 300]
    row = re.search(r"^\| wait before its next attempt \(s\) \|(.*)\|$",
                    (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE)
    shown = [float(cell.split()[0]) for cell in row.group(1).split("|")]
    assert shown == RetryPolicy().schedule(7)


def test_the_policy_is_read_from_the_timings_in_force(timing):
    timing(upload_retry_delays=(0.1, 0.2), upload_retry_max_seconds=0.5)
    assert RetryPolicy.current().schedule(5) == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_the_cap_bounds_the_listed_delays_too():
    assert RetryPolicy((2, 10, 30), 5).schedule(4) == [2, 5, 5, 5]
    assert RetryPolicy((), 7).schedule(2) == [7, 7]
    assert RetryPolicy.constant(3).schedule(3) == [3, 3, 3]


def test_bad_counts_and_negative_delays_are_refused():
    with pytest.raises(ValueError):
        RetryPolicy().delay(0)
    with pytest.raises(ValueError):
        RetryPolicy((1, -1), 5)
    with pytest.raises(ValueError):
        RetryPolicy((1,), -5)


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("error, failure", [
    (GirderAuthError("log in: HTTP 401: token expired"), Failure.AUTHENTICATION),
    (GirderUnreachableError("upload file: HTTP 503"), Failure.UNREACHABLE),  # the class decides
    (GirderTransientError("create item: Girder unreachable: refused"), Failure.TRANSIENT),
    (StorageError("disk full"), Failure.TRANSIENT),
    (GirderTerminalError("upload file: HTTP 403: denied"), Failure.TERMINAL),
    (GirderUnknownIdError("create item: HTTP 400: x"), Failure.TERMINAL),
    (GirderNameTakenError("create folder: HTTP 400: x"), Failure.TERMINAL),
    (GirderRootFolderGone("the root folder is gone"), Failure.FATAL),
    (RuntimeError("a bug"), Failure.UNEXPECTED),
])
def test_failures_are_classified_by_class_never_by_text(error, failure):
    assert classify(error) is failure


def test_what_each_failure_means_for_a_file_and_its_unit():
    retried = {f for f in Failure if f.retried}
    assert retried == {Failure.TRANSIENT, Failure.UNREACHABLE, Failure.AUTHENTICATION,
                       Failure.UNEXPECTED}
    stops = {f for f in Failure if f.stops_the_batch}
    assert Failure.TRANSIENT not in stops and Failure.TERMINAL not in stops
    assert {Failure.UNREACHABLE, Failure.AUTHENTICATION} <= stops


def _http(status: int, message: str, kind: str = "rest") -> HttpError:
    return HttpError(status=status, url="http://girder/api/v1/x", method="POST",
                     text=json.dumps({"message": message, "type": kind}))


@pytest.mark.parametrize("exc, what, cls, attributes", [
    (_http(400, "Invalid folder id (abc)."), "create item", GirderUnknownIdError,
     {"model": "folder", "status": 400}),
    (_http(400, "A folder with that name already exists here.", "validation"),
     "create folder", GirderNameTakenError, {"taken_by": "folder", "status": 400}),
    (_http(400, "An item with that name already exists here.", "validation"),
     "create folder", GirderNameTakenError, {"taken_by": "item"}),
    (_http(400, "A collection with that name already exists.", "validation"),
     "create collection", GirderNameTakenError, {"taken_by": "collection"}),
    (_http(400, "Path not found: collection/x"), "find collection", GirderTerminalError,
     {"status": 400}),
    (_http(403, "Access denied"), "upload file", GirderTerminalError, {"status": 403}),
    (_http(503, "busy"), "upload file", GirderTransientError, {"status": 503}),
    (_http(429, "slow down"), "upload file", GirderTransientError, {"status": 429}),
    (_http(401, "token expired"), "list items", GirderAuthError, {"status": 401}),
    (_http(400, "Invalid API key."), "log in", GirderAuthError, {"status": 400}),
    (requests.ConnectionError("refused"), "upload file", GirderUnreachableError,
     {"status": None}),
    (requests.Timeout("slow"), "upload file", GirderUnreachableError, {}),
])
def test_girders_answers_become_classes_in_one_place(exc, what, cls, attributes):
    error = translate(exc, what, "a/b.txt", ("secret",))
    assert type(error) is cls
    for name, value in attributes.items():
        assert getattr(error, name) == value
    assert str(error).startswith(what) and error.rel_path == "a/b.txt"


def test_no_upload_module_tests_an_errors_text():
    """The sites that matched texts ("Girder unreachable", "invalid folder id", "already
    exists", "HTTP 400", "TOPIC_ALREADY_EXISTS") now test classes and fields."""
    pattern = re.compile(r"""["'][^"']*["'] (not )?in (str\(exc\)|exc\.message|repr\(exc\))""")
    for folder in ("girder_upload_stream", "tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert not pattern.search(text), path
            assert "str(exc).lower()" not in text, path


def test_an_already_existing_key_exchange_topic_is_told_by_its_error_code(monkeypatch):
    from confluent_kafka import KafkaError, KafkaException

    from girder_upload_stream.kafka import crypto

    class Future:
        def __init__(self, code):
            self.code = code

        def result(self, timeout=None):
            if self.code is not None:
                raise KafkaException(KafkaError(self.code, "some text"))

    class Admin:
        codes = {}

        def __init__(self, settings):
            pass

        def create_topics(self, topics, operation_timeout=None):
            return {t.topic: Future(self.codes.get(t.topic)) for t in topics}

    monkeypatch.setattr("confluent_kafka.admin.AdminClient", Admin)
    names = crypto.key_exchange_topics("t")
    monkeypatch.setattr(crypto, "missing_key_exchange_topics", lambda *a, **k: list(names))
    Admin.codes = {names[0]: KafkaError.TOPIC_ALREADY_EXISTS}
    assert crypto.ensure_key_exchange_topics({}, "t") == names[1:]
    Admin.codes = {names[0]: KafkaError.TOPIC_AUTHORIZATION_FAILED}
    with pytest.raises(crypto.ConfigError):
        crypto.ensure_key_exchange_topics({}, "t")


# ---------------------------------------------------------------- the ledger retries


def test_the_ledger_retries_a_file_by_the_policy_until_it_lands():
    clock = Clock()
    proc = make_processor(clock=clock, retry_policy=RetryPolicy((2, 10), 25))
    proc.handle(one_chunk(Log(), 1, b"retry me", "r.txt"))
    waits = []
    for _ in range(5):
        [unit] = proc.take_units()
        proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
        assert proc.offsets.committable() == {(TOPIC, 1): 0}  # registered, uncommitted
        assert proc.take_units() == [] and not proc.idle
        start = clock.now
        while not proc.ledger.in_state(FileState.READY) and clock.now - start < 100:
            clock.now += 1
            proc.ledger.due(clock.now)
        waits.append(clock.now - start)
    assert waits == [2, 10, 20, 25, 25]
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == {(TOPIC, 1): 1} and proc.idle
    assert proc.counters.files_uploaded == 1 and proc.counters.files_failed == 0


def test_a_retried_file_goes_at_once_without_lingering_for_company():
    clock = Clock()
    proc = make_processor(clock=clock, retry_policy=RetryPolicy((2,), 2), linger_seconds=5)
    proc.handle(one_chunk(Log(), 0, b"x", "x.txt"))
    assert proc.take_units() == []  # a new file lingers for company
    clock.now += 5
    [unit] = proc.take_units()
    proc.fail_unit(unit, "GirderUnreachableError: refused")
    clock.now += 2
    [again] = proc.take_units()
    assert [f.rel_path for f in again.files] == ["x.txt"]


def test_a_unit_that_raises_is_retried_by_the_ledger_not_by_the_executor():
    from tests.unit.fakes import make_runner, put_file
    clock = Clock(now=100.0)
    runner, group, submit = make_runner(clock=clock)
    runner.processor.retry_policy = RetryPolicy((1, 3), 3)
    put_file(group, b"abc", "f.txt", [0])
    runner.step()
    [first] = submit.handles
    first.crash(GirderUnreachableError("upload file: refused"))
    runner.step()
    assert len(submit.handles) == 1  # waits 1 s
    clock.now += 1
    runner.step()
    assert len(submit.handles) == 2
    submit.handles[1].crash(GirderAuthError("list items: HTTP 401"))
    runner.step()
    clock.now += 2.9
    runner.step()
    assert len(submit.handles) == 2  # 3 s this time
    clock.now += 0.1
    runner.step()
    submit.handles[2].finish()
    runner.step()
    assert runner.processor.counters.files_uploaded == 1


# ---------------------------------------------------------------- the executor interface


class InlineExecutor(UploadExecutor):
    """Fills the interface as a test would: runs each job at once, in this thread."""

    def __init__(self, n_threads: int, files=None) -> None:
        super().__init__(n_threads, files)
        self.jobs: list[Job] = []
        self.closed = False

    def start(self, job: Job):
        self.jobs.append(job)
        from concurrent.futures import Future
        future: Future = Future()
        try:
            future.set_result(job.run())
        except Exception as exc:  # noqa: BLE001 - the handle carries it
            future.set_exception(exc)
        return future

    def close(self) -> None:
        self.closed = True


def test_the_interface_describes_each_job_once_whoever_runs_it():
    store = FakeStore(set(), "")
    with InlineExecutor(2, files=None) as executor:
        unit = _unit(["a.bin", "b.bin"])
        outcomes_ = executor.submit_upload(unit, store).result()
        probe = executor.submit_probe([("a.bin", b"\0")], type("S", (), {
            "holds": lambda self, path, h: True})()).result()
    assert executor.closed
    assert [j.kind for j in executor.jobs] == ["upload", "probe"]
    assert executor.jobs[0].params == {"unit": unit, "store": store, "files": None}
    assert executor.jobs[0].name.startswith(f"upload unit {unit.unit_id} (")
    assert [o.outcome for o in outcomes_] == [Outcome.UPLOADED, Outcome.UPLOADED]
    assert probe == [(("a.bin", b"\0"), True)]


def test_an_executor_must_fill_start_and_close():
    class Half(UploadExecutor):
        def start(self, job):
            return None

    with pytest.raises(TypeError):
        Half(1)  # close() missing


def test_both_ways_fill_the_interface_and_run_the_same_bodies():
    from girder_upload_stream.tasks.upload import TASKS, PrefectUploads
    assert issubclass(ThreadUploads, UploadExecutor) and issubclass(PrefectUploads, UploadExecutor)
    assert {kind: task.fn for kind, task in TASKS.items()}.keys() == BODIES.keys()
    store = FakeStore(set(), "")
    unit = _unit(["a.bin"])
    assert TASKS["upload"].fn(unit, store, None) == BODIES["upload"](unit, store, None)


def test_the_prefect_way_submits_the_task_of_each_job(monkeypatch):
    from girder_upload_stream.tasks.upload import TASKS, PrefectUploads

    class Runner:
        def __init__(self):
            self.submitted = []

        def submit(self, task, params):
            self.submitted.append((task, params))
            return type("F", (), {"wrapped_future": type("W", (), {"done": lambda s: True})(),
                                  "result": lambda s, raise_on_failure: "ok"})()

    executor = PrefectUploads(2)
    executor._runner = Runner()
    unit = _unit(["a.bin"])
    handle = executor.submit_upload(unit, "store")
    executor.submit_probe([("a.bin", b"\0")], "store")
    assert handle.done() and handle.result() == "ok"
    (t1, p1), (t2, p2) = executor._runner.submitted
    assert t1 is TASKS["upload"] and p1 == {"unit": unit, "store": "store", "files": None}
    assert t2 is TASKS["probe"] and p2["n"] == 1 and p2["keys"] == [("a.bin", b"\0")]


def test_a_5xx_outcome_reason_reaches_the_registry_as_a_transient_failure():
    clock = Clock()
    proc = make_processor(clock=clock, retry_policy=RetryPolicy((4,), 4))
    proc.handle(one_chunk(Log(), 0, b"x", "x.txt"))
    [unit] = proc.take_units()
    key = unit.files[0].file_key
    proc.finish_unit(unit, [FileOutcome("x.txt", key, Outcome.FAILED_TRANSIENT, "HTTP 503")])
    assert proc.recorder.of("file_outcome")[-1][2] is Outcome.FAILED_TRANSIENT
    assert proc.ledger.get(key).failures == 1 and proc.ledger.get(key).retry_at == clock.now + 4
