"""Unit tests of a command-line run whose Prefect flow run is created beside it
(girder_upload_stream.prefect_glue.late_flow_run): the run consumes and uploads on the
plain pool before the flow run exists, moves onto it when it attaches (task runs made
in the flow run's context, artifacts, its log), waits for it at its end, and stops with
a clear error when it cannot be created. Fakes only: no Prefect, Kafka or Girder."""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from girder_upload_stream import timings
from girder_upload_stream.ledger.records import FileLedger
from girder_upload_stream.prefect_glue import late_flow_run as L

#: Set in the fake flow run's thread: visible to a call only in the flow run's context.
FLOW_RUN = contextvars.ContextVar("FLOW_RUN", default=None)
WAIT = 10.0  # seconds a test waits for another thread's step, at most


class FakeUploads:
    """Records each submission, with the flow run (if any) whose context it ran in."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events
        self.entered = self.exited = False

    def __enter__(self) -> FakeUploads:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited = True

    def submit_upload(self, unit, store):
        self.events.append((self.name, "upload", unit, FLOW_RUN.get()))
        return SimpleNamespace(done=lambda: True, result=lambda: [])

    def submit_probe(self, keys, store):
        self.events.append((self.name, "probe", tuple(keys), FLOW_RUN.get()))
        return SimpleNamespace(done=lambda: True, result=lambda: [])


class FakePublisher:
    def __init__(self, recorder, topic, group, *, publish, active, started) -> None:
        self.args = (recorder, topic, group)
        self.publish, self.active, self.started = publish, active, started
        self.ticks: list[bool] = []

    def tick(self, runner, final: bool = False) -> None:
        self.ticks.append(final)
        self.publish("summary" if final else "progress")


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def log(self, level: int, msg: str, *args) -> None:
        self.lines.append((level, msg % args))


def flow_run_parts(events: list, published: list, api_lines: list,
                   fallback: set | None = None) -> L.PrefectParts:
    """What the flow run gives, made in a thread standing for the flow run's."""
    made: list[L.PrefectParts] = []

    def in_flow_thread() -> None:
        FLOW_RUN.set("flow-run-1")
        made.append(L.PrefectParts(
            contextvars.copy_context(), FakeLog(),
            uploads=lambda n, files=None: FakeUploads("prefect", events),
            side_job=FakePublisher,
            registry_fallback=(lambda topic, group: set(fallback)) if fallback else None,
            publish=lambda pub: published.append((pub, FLOW_RUN.get())),
            api_log=lambda record: api_lines.append((record.getMessage(), FLOW_RUN.get()))))

    thread = threading.Thread(target=in_flow_thread)
    thread.start()
    thread.join()
    return made[0]


def fake_runner(had_local_state: bool = True) -> SimpleNamespace:
    return SimpleNamespace(side_jobs=[], fatal=None,
                           settings=SimpleNamespace(upload_linger_seconds=5.0),
                           processor=SimpleNamespace(ledger=FileLedger(), linger_seconds=0.0),
                           recorder=SimpleNamespace(had_local_state=had_local_state))


def make_job(link: L.FlowRunLink, events: list, runner: SimpleNamespace,
             plain_log: logging.Logger | None = None):
    log = L.LateLog(plain_log or logging.getLogger("test.late"))
    uploads = L.LateUploads(FakeUploads("plain", events)).__enter__()
    job = L.AttachJob(link, log, uploads, 2, None, runner.recorder, "topic", "group",
                      started=123.0)
    runner.side_jobs.append(job)
    return job, log, uploads


def attach_in_thread(link: L.FlowRunLink, parts: L.PrefectParts) -> dict:
    """The flow run's body: attach (blocks until the run ends); its result or error."""
    out: dict = {}

    def body() -> None:
        try:
            out["summary"] = link.attach(parts)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc

    out["thread"] = threading.Thread(target=body)
    out["thread"].start()
    return out


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_units_go_to_the_plain_pool_until_the_flow_run_attaches_then_to_its_task_runs():
    events, published, api_lines = [], [], []
    link, runner = L.FlowRunLink(), fake_runner()
    job, log, uploads = make_job(link, events, runner)
    log.info("consuming %s", "topic")
    uploads.submit_upload("unit-1", store=None)
    job.tick(runner)  # no flow run yet: nothing changes
    assert not uploads.on_prefect and len(runner.side_jobs) == 1
    assert runner.processor.linger_seconds == 0  # a unit costs no task run yet
    flow = attach_in_thread(link, flow_run_parts(events, published, api_lines))
    wait_for(lambda: link.state is L.LinkState.ATTACHED, "the flow run to attach")
    for job_ in runner.side_jobs:  # as StreamRunner.step: the publisher ticks too
        job_.tick(runner)
    assert runner.processor.linger_seconds == 5.0  # units are task runs: files linger
    uploads.submit_upload("unit-2", store=None)
    uploads.submit_probe(["k"], store=None)
    log.info("after %d", 1)
    assert events == [("plain", "upload", "unit-1", None),
                      ("prefect", "upload", "unit-2", "flow-run-1"),
                      ("prefect", "probe", ("k",), "flow-run-1")]
    publisher = runner.side_jobs[1]
    assert isinstance(publisher, FakePublisher) and publisher.args[1:] == ("topic", "group")
    assert publisher.started == 123.0  # the run's start, not the attach
    assert published == [("progress", "flow-run-1")]  # published in the flow run
    # The early line reaches the flow run's log (API only), the later one its logger.
    assert api_lines == [("(before the flow run started) consuming topic", "flow-run-1")]
    assert [text for _, text in link.parts.log.lines] == [
        "the flow run records this run from now on: upload units are its task runs; "
        "1 line(s) logged before it exists are in its log", "after 1"]
    assert flow["thread"].is_alive()  # the flow run waits for the run's end
    link.end({"files_uploaded": 2})
    flow["thread"].join(WAIT)
    assert flow["summary"] == {"files_uploaded": 2}
    uploads.__exit__(None, None, None)
    assert uploads._plain.exited and uploads._prefect.exited


def test_a_run_that_ends_first_waits_for_its_flow_run_so_its_end_is_recorded():
    events, published, api_lines = [], [], []
    link, runner = L.FlowRunLink(), fake_runner()
    job, _, _ = make_job(link, events, runner)
    parts = flow_run_parts(events, published, api_lines)
    timer = threading.Timer(0.3, lambda: attach_in_thread(link, parts))
    timer.start()
    for job_ in runner.side_jobs:  # as StreamRunner._final_ticks: appended jobs tick too
        job_.tick(runner, final=True)
    assert link.state is L.LinkState.ATTACHED and not link.abandoned
    assert published == [("summary", "flow-run-1")]
    link.end({"x": 1})
    timer.join()


def test_the_run_gives_up_waiting_after_flow_run_start_seconds():
    link, runner = L.FlowRunLink(), fake_runner()
    job, _, _ = make_job(link, [], runner)
    with timings.overridden(flow_run_start_seconds=0.05):
        job.tick(runner, final=True)
    assert link.abandoned and len(runner.side_jobs) == 1 and runner.fatal is None
    link.end({"files_uploaded": 1})
    # A flow run that comes after all returns the summary at once (no second consumer).
    assert link.attach(flow_run_parts([], [], [])) == {"files_uploaded": 1}


def test_a_flow_run_that_cannot_be_created_stops_the_run_with_the_error():
    link, runner = L.FlowRunLink(), fake_runner()
    job, _, uploads = make_job(link, [], runner)
    link.fail(RuntimeError("Prefect API refused"))
    job.tick(runner)
    assert isinstance(runner.fatal, L.FlowRunUnavailable)
    assert "Prefect API refused" in str(runner.fatal) and not uploads.on_prefect


def test_the_flow_run_fails_with_the_error_the_run_ended_with():
    link = L.FlowRunLink()
    link.end(error=ValueError("registry unreadable"))
    with pytest.raises(ValueError, match="registry unreadable"):
        link.attach(flow_run_parts([], [], []))


def test_the_registry_fallback_is_read_at_the_attach_when_there_was_no_local_registry():
    key = ("dir/a.bin", "g" * 32)
    for had_local_state, expected in ((False, {key}), (True, set())):
        link, runner = L.FlowRunLink(), fake_runner(had_local_state)
        job, _, _ = make_job(link, [], runner)
        flow = attach_in_thread(link, flow_run_parts([], [], [], fallback={key}))
        wait_for(lambda: link.state is L.LinkState.ATTACHED, "the flow run to attach")
        job.tick(runner)
        assert runner.processor.ledger.known_done == expected
        assert runner.processor.ledger.known_in_girder == expected
        link.end({})
        flow["thread"].join(WAIT)


def test_the_session_starts_before_prefect_and_the_flow_run_returns_its_summary(monkeypatch):
    """run_with_late_flow_run: the session runs at once, in the caller's thread; the
    flow run (here a fake whose 'Prefect import' waits until the session has uploaded
    a unit) attaches later; units after it are its task runs; its result is the summary."""
    events: list = []
    uploaded_first = threading.Event()
    flow_results: list = []

    def fake_flow_run_thread(params, link, load_flow):
        assert load_flow is flow_loader
        def body():
            assert uploaded_first.wait(WAIT)  # Prefect "imports" while the run consumes
            waiting = L.take_waiting_run(params["girder_api_url"], params["topic_name"])
            flow_results.append(waiting.attach(flow_run_parts(events, [], [])))
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    def fake_run_session(p, girder, hooks, prepared):
        with hooks.uploads(2, files=None) as uploads:
            runner = fake_runner()
            runner.side_jobs.append(hooks.side_job(runner.recorder, p["topic_name"], "g"))
            uploads.submit_upload("first", None)
            uploaded_first.set()
            wait_for(lambda: (runner.side_jobs[0].tick(runner) or uploads.on_prefect),
                     "the flow run to attach")
            uploads.submit_upload("second", None)
        return {"files_uploaded": 2, "prepared": prepared}

    flow_loader = object()
    monkeypatch.setattr(L, "_flow_run_thread", fake_flow_run_thread)
    monkeypatch.setattr("girder_upload_stream.loop.session.run_session", fake_run_session)
    params = {"girder_api_url": "http://girder/api/v1", "topic_name": "t"}
    summary = L.run_with_late_flow_run(params, SimpleNamespace(api_url="x"), "prepared",
                                       load_flow=flow_loader,
                                       plain_uploads=lambda n, files=None:
                                       FakeUploads("plain", events))
    assert summary == {"files_uploaded": 2, "prepared": "prepared"}
    assert [(e[0], e[2], e[3]) for e in events] == [("plain", "first", None),
                                                   ("prefect", "second", "flow-run-1")]
    assert flow_results == [summary]  # the flow run's result, once it returned


class _Ran(Exception):
    """Ends the fake run once the session has wired it."""


@pytest.mark.parametrize("linger, expected", [(True, 5.0), (False, 0.0)])
def test_files_wait_for_company_only_where_the_hooks_say_units_are_task_runs(
        monkeypatch, tmp_path, linger, expected):
    """run_session's wiring: ``Hooks.linger`` False (the plain pool, a command-line run
    before its flow run exists) sets the processor's linger to 0; True keeps
    --upload_linger_seconds."""
    from girder_upload_stream.loop import session
    from girder_upload_stream.options import OPTIONS
    seen = []

    def fake_build_runner(run, kafka, submit, **kwargs):
        runner = SimpleNamespace(processor=SimpleNamespace(linger_seconds=run.upload_linger_seconds,
                                                           recorder=None),
                                 side_jobs=[])

        def run_():
            seen.append(runner.processor.linger_seconds)
            raise _Ran
        runner.run = run_
        return runner

    monkeypatch.setattr(session, "build_runner", fake_build_runner)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # the config names it
    p = {option.name: option.default for option in OPTIONS if option.flow}
    p.update(config="local", topic_name="t", output_dir=str(tmp_path), interactive=False,
             upload_linger_seconds=5.0)
    girder = SimpleNamespace(api_url="http://girder/api/v1",
                             api_key=SimpleNamespace(get_secret_value=lambda: "k"))
    hooks = session.Hooks(log=logging.getLogger("test"), linger=linger,
                          uploads=lambda n, files=None: FakeUploads("plain", []))
    with pytest.raises(_Ran):
        session._run_locked(p, girder, hooks, SimpleNamespace(), "root",
                            SimpleNamespace(group_id="g"), None)
    assert seen == [expected]
    assert session.plain_hooks().linger is False
    assert L.late_hooks(L.FlowRunLink(), lambda n, files=None: None).linger is False


def test_no_second_fallback_read_at_the_attach_when_it_was_read_before_consuming():
    key = ("dir/a.bin", "g" * 32)
    link, runner = L.FlowRunLink(), fake_runner(had_local_state=False)
    job, _, _ = make_job(link, [], runner)
    job._fallback_read = lambda: True
    flow = attach_in_thread(link, flow_run_parts([], [], [], fallback={key}))
    wait_for(lambda: link.state is L.LinkState.ATTACHED, "the flow run to attach")
    job.tick(runner)
    assert runner.processor.ledger.known_done == set()
    link.end({})
    flow["thread"].join(WAIT)


class _ArtifactApi:
    """A stand-in for the Prefect REST API's ``GET /artifacts/{key}/latest``."""

    def __init__(self, status: int, body: dict | None = None) -> None:
        import http.server
        api = self
        self.status, self.body, self.requests = status, body, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                api.requests.append((self.path, self.headers.get("Authorization")))
                payload = json.dumps(api.body or {"detail": "x"}).encode()
                self.send_response(api.status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_registry_fallback_is_read_over_http_without_prefect(monkeypatch):
    from girder_upload_stream.prefect_glue.artifacts import read_registry_fallback_over_http
    from girder_upload_stream.registry.artifact_content import artifact_keys
    rows = [{"rel_filepath": "dir/a.bin", "generation": "g" * 32}, {"rel_filepath": "b"}]
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pass")
    for status, body, expected in ((200, {"data": json.dumps(rows)}, {("dir/a.bin", "g" * 32)}),
                                   (404, None, set()), (500, None, None)):
        api = _ArtifactApi(status, body)
        try:
            assert read_registry_fallback_over_http(api.url, "topic", "group") == expected
        finally:
            api.close()
        key = artifact_keys("topic", "group").recent_uploads
        assert api.requests == [(f"/api/artifacts/{key}/latest", "Basic YWRtaW46cGFzcw==")]
    # Nothing answers: None (read through Prefect at the attach instead).
    assert read_registry_fallback_over_http("http://127.0.0.1:9/api", "t", "g", 2) is None


def test_the_command_line_hands_over_the_flow_to_load():
    """The late flow run does not import the flow itself (the flow imports this module):
    the command line gives it the loader, which returns the flow girder-upload-stream."""
    from girder_upload_stream.cli.run import _load_flow
    from girder_upload_stream.flows.upload_stream import upload_stream
    assert _load_flow() is upload_stream
