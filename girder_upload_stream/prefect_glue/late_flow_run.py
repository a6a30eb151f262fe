"""A command-line run that consumes at once while its Prefect flow run is created
beside it, then records in that flow run from the moment it exists.

Importing Prefect and creating a flow run take seconds (about 2.5 on an idle two-core
machine, 8 to 10 on a busy one: more than the whole start-up of a run without Prefect). So, with a Prefect API
configured, the command line runs the session (:func:`~girder_upload_stream.loop.session.run_session`)
in its main thread straight away, with upload units on the plain thread pool, while a
background thread imports Prefect and calls the flow ``girder-upload-stream`` with the
run's parameters. The flow's body finds this process's waiting run
(:func:`take_waiting_run`) and, instead of running a second consumer, hands the run its
Prefect parts (:class:`PrefectParts`: the flow run's context, its logger, the task
runner, the artifact publisher, the registry fallback) and waits for the run's end,
whose summary it returns (or whose exception it raises) as the flow run's result.

From then on, in the run's own thread (:class:`AttachJob`, a side job of the loop):
new upload units and lookups are task runs of the flow run (units already running on
the plain pool finish there), the run's log lines go to the flow run's logger (the
lines logged before are sent to the flow run's log too), the artifacts are published
for the flow run. The registry fallback (when the logs folder has no registry) is read
before consuming with one plain HTTP request to the Prefect API, as the flow reads it
before consuming; only if that fails is it read through Prefect at the attach. A run that ends first waits for its flow run (at most
``flow_run_start_seconds``, a timing setting) so that the final artifacts still land
in it. If the flow run cannot be created the run stops gracefully with the error
(exit status 2), as it would have failed before consuming when Prefect came first.

:class:`FlowRunLink` is the one object both threads share, a small state machine:
``starting`` -> ``attached`` -> ``ended``, or ``starting`` -> ``failed``, or
``starting`` -> ``ended`` (the run gave up waiting; the flow run, if it comes, returns
the summary at once). No Prefect import here: the caller's thread imports it.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from girder_upload_stream import startup, timings
from girder_upload_stream.errors import FatalError

__all__ = ["LinkState", "PrefectParts", "FlowRunLink", "FlowRunUnavailable", "LateLog",
           "LateUploads", "AttachJob", "take_waiting_run", "late_hooks",
           "run_with_late_flow_run", "flow_run_api_log"]

logger = logging.getLogger("girder_upload_stream.run")

#: The most log lines of the run kept, before its flow run exists, for its log.
MAX_EARLY_LINES = 100

#: Runs of this process waiting for their flow run, by (Girder API URL, topic).
_WAITING: dict[tuple[str | None, str], FlowRunLink] = {}
_WAITING_LOCK = threading.Lock()


class LinkState(enum.Enum):
    STARTING = "starting"  # Prefect being imported, the flow run being created
    ATTACHED = "attached"  # the flow run gave its parts; it waits for the run's end
    FAILED = "failed"      # the flow run could not be created
    ENDED = "ended"        # the run is over (summary or error handed to the flow run)


class FlowRunUnavailable(FatalError):
    """The run's flow run could not be created (Prefect failed to import or to start
    it): the run stops gracefully and the command exits with status 2."""


@dataclass
class PrefectParts:
    """What the flow run gives the run once it exists. ``context`` is a copy of the
    flow run's ``contextvars`` context: every Prefect call the run's thread makes goes
    through :meth:`call`, so that task runs and artifacts belong to the flow run."""

    context: contextvars.Context
    log: Any  # the flow run's logger
    uploads: Callable[..., Any]  # (n_threads, files=) -> Uploads on Prefect task runs
    side_job: Callable[..., Any]  # ArtifactPublisher(recorder, topic, group, **kw)
    registry_fallback: Callable[[str, str], set[tuple[str, str]]] | None = None
    publish: Callable[[Any], Any] | None = None  # one artifact Publication
    api_log: Callable[[logging.LogRecord], None] | None = None  # to the flow run's log only

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the flow run's context (from the run's thread)."""
        return self.context.run(fn, *args, **kwargs)


class FlowRunLink:
    """The state shared by the run (its thread) and its flow run (Prefect's thread)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.state = LinkState.STARTING
        self.parts: PrefectParts | None = None
        self.error: BaseException | None = None  # why the flow run could not start
        self._summary: dict[str, Any] | None = None
        self._run_error: BaseException | None = None
        self.abandoned = False  # the run stopped waiting for its flow run

    # -- the flow run's side ---------------------------------------------------------
    def attach(self, parts: PrefectParts) -> dict[str, Any]:
        """Give the run ``parts`` and wait for its end: its summary, or its exception
        raised here (the flow run then fails with it)."""
        with self._cond:
            if self.state is LinkState.STARTING:
                self.parts, self.state = parts, LinkState.ATTACHED
                self._cond.notify_all()
            while self.state is not LinkState.ENDED:
                self._cond.wait()
            if self._run_error is not None:
                raise self._run_error
            return dict(self._summary or {})

    def fail(self, error: BaseException) -> None:
        """The flow run could not be created."""
        with self._cond:
            if self.state is LinkState.STARTING:
                self.error, self.state = error, LinkState.FAILED
                self._cond.notify_all()

    # -- the run's side --------------------------------------------------------------
    def wait_decided(self, timeout: float) -> LinkState:
        """Wait (at most ``timeout`` seconds) until the flow run attached or failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.state is not LinkState.STARTING, timeout)
            return self.state

    def end(self, summary: dict[str, Any] | None = None,
            error: BaseException | None = None) -> None:
        """The run is over: the flow run (now or when it comes) returns ``summary``
        or raises ``error``."""
        with self._cond:
            self._summary, self._run_error = summary, error
            self.state = LinkState.ENDED
            self._cond.notify_all()


def _register(girder_api_url: str | None, topic: str, link: FlowRunLink) -> None:
    with _WAITING_LOCK:
        _WAITING[(girder_api_url, topic)] = link


def take_waiting_run(girder_api_url: str | None, topic: str) -> FlowRunLink | None:
    """The run of this process waiting for a flow run of these settings, if any (taken:
    a second flow run of the same settings runs its own consumer)."""
    with _WAITING_LOCK:
        return _WAITING.pop((girder_api_url, topic), None)


class LateLog:
    """The run's logger: the command's own until the flow run attaches, the flow run's
    after; the lines logged before are kept and then sent to the flow run's log."""

    def __init__(self, plain: logging.Logger) -> None:
        self._target: Any = plain
        self._early: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def switch(self, parts: PrefectParts) -> int:
        """Log to the flow run from now on; the number of earlier lines sent to it."""
        with self._lock:
            self._target, early, self._early = parts.log, self._early, []
        if parts.api_log is None:
            return 0
        for record in early:  # with their own time; the console had them already
            parts.call(parts.api_log, record)
        return len(early)

    def log(self, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            target = self._target
            if isinstance(target, logging.Logger) and len(self._early) < MAX_EARLY_LINES:
                self._early.append(logging.LogRecord(
                    target.name, level, __file__, 0, f"(before the flow run started) {msg}",
                    args, None))
        target.log(level, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)


class LateUploads:
    """Upload units and lookups on the plain pool until :meth:`switch`, on the flow
    run's task runner after; leaving the ``with`` block waits for both."""

    def __init__(self, plain: Any) -> None:
        self._plain, self._prefect, self._parts = plain, None, None

    def __enter__(self) -> LateUploads:
        self._plain.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._prefect is not None:
                self._parts.call(self._prefect.__exit__, *exc)
        finally:
            self._plain.__exit__(*exc)

    @property
    def on_prefect(self) -> bool:
        return self._prefect is not None

    def switch(self, parts: PrefectParts, n_threads: int, files: Any) -> None:
        prefect = parts.uploads(n_threads, files=files)
        parts.call(prefect.__enter__)
        self._prefect, self._parts = prefect, parts

    def submit_upload(self, unit: Any, store: Any) -> Any:
        if self._prefect is None:
            return self._plain.submit_upload(unit, store)
        return self._parts.call(self._prefect.submit_upload, unit, store)

    def submit_probe(self, keys: list, store: Any) -> Any:
        if self._prefect is None:
            return self._plain.submit_probe(keys, store)
        return self._parts.call(self._prefect.submit_probe, keys, store)


class AttachJob:
    """Side job of the loop: once the flow run exists, move the run onto it (see the
    module's docstring); if it cannot be created, stop the run with the error. At the
    final tick it waits for the flow run (``flow_run_start_seconds`` at most)."""

    def __init__(self, link: FlowRunLink, log: LateLog, uploads: LateUploads,
                 n_threads: int, files: Any, recorder: Any, topic: str, group: str,
                 started: float | None = None,
                 fallback_read: Callable[[], bool] = lambda: False) -> None:
        self.link, self.log, self.uploads = link, log, uploads
        self._fallback_read = fallback_read  # True: read before consuming already
        self._n_threads, self._files = n_threads, files
        self.recorder, self.topic, self.group = recorder, topic, group
        self._started = started
        self.done = False

    def tick(self, runner: Any, final: bool = False) -> None:
        if self.done:
            return
        if final and self.link.state is LinkState.STARTING:
            wait = timings.current().flow_run_start_seconds
            logger.info("waiting up to %g s for the flow run to be created", wait)
            if self.link.wait_decided(wait) is LinkState.STARTING:
                self.done = self.link.abandoned = True
                logger.warning("no flow run after %g s: this run is not recorded in "
                               "Prefect", wait)
                return
        if self.link.state is LinkState.FAILED:
            self.done = True
            self._stop(runner, self.link.error)
        elif self.link.state is LinkState.ATTACHED:
            self.done = True
            try:
                self._attach(runner, self.link.parts)
            except Exception as exc:  # noqa: BLE001 - the run stops, gracefully
                self._stop(runner, exc)

    @staticmethod
    def _stop(runner: Any, error: BaseException | None) -> None:
        runner.fatal = FlowRunUnavailable(
            f"the flow run could not be created ({type(error).__name__}: {error})")

    def _attach(self, runner: Any, parts: PrefectParts) -> None:
        self.uploads.switch(parts, self._n_threads, self._files)
        # Units are task runs now: completed files wait for company again.
        runner.processor.linger_seconds = runner.settings.upload_linger_seconds
        early = self.log.switch(parts)
        startup.mark(startup.FLOW_RUN_ATTACHED)
        self.log.info("the flow run records this run from now on: upload units are its "
                      "task runs; %d line(s) logged before it exists are in its log", early)
        publisher = parts.side_job(self.recorder, self.topic, self.group,
                                   publish=lambda pub: parts.call(parts.publish, pub),
                                   active=lambda: True, started=self._started)
        runner.side_jobs.append(publisher)  # ticked after this job, in this round too
        if (parts.registry_fallback is not None and not self.recorder.had_local_state
                and not self._fallback_read()):
            keys = parts.call(parts.registry_fallback, self.topic, self.group)
            runner.processor.ledger.learn_done(keys)
            logger.info("no local registry of %s/%s: %d processed file(s) taken from the "
                        "flow run's registry fallback", self.topic, self.group, len(keys))


def flow_run_api_log(run_logger: Any) -> Callable[[logging.LogRecord], None]:
    """Send a record to the flow run's log in the Prefect API only (no second copy on
    the console). Called in the flow run's thread: Prefect is imported there."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler()
    extra = dict(getattr(run_logger, "extra", None) or {})

    def send(record: logging.LogRecord) -> None:
        for name, value in extra.items():
            setattr(record, name, value)
        handler.handle(record)

    return send


def late_hooks(link: FlowRunLink, plain_uploads: Callable[..., Any],
               log: logging.Logger | None = None, api_url: str | None = None) -> Any:
    """The session's hooks of a run whose flow run comes later (:class:`AttachJob`);
    ``api_url``, the Prefect API's, to read the registry fallback before consuming."""
    from girder_upload_stream.loop.session import Hooks
    from girder_upload_stream.prefect_glue.artifacts import read_registry_fallback_over_http

    late_log = LateLog(log or logger)
    made: dict[str, Any] = {"fallback_read": False}
    started = time.monotonic()

    def registry_fallback(topic: str, group: str) -> set[tuple[str, str]]:
        keys = read_registry_fallback_over_http(api_url, topic, group) if api_url else None
        made["fallback_read"] = keys is not None
        return keys or set()

    def uploads(n_threads: int, files: Any = None) -> LateUploads:
        made.update(uploads=LateUploads(plain_uploads(n_threads, files=files)),
                    n_threads=n_threads, files=files)
        return made["uploads"]

    def side_job(recorder: Any, topic: str, group: str) -> AttachJob:
        return AttachJob(link, late_log, made["uploads"], made["n_threads"], made["files"],
                         recorder, topic, group, started=started,
                         fallback_read=lambda: made["fallback_read"])

    return Hooks(log=late_log, uploads=uploads, side_job=side_job, linger=False,
                 registry_fallback=registry_fallback)


def _flow_run_thread(params: Mapping[str, Any], link: FlowRunLink,
                     load_flow: Callable[[], Callable[..., Any]]) -> threading.Thread:
    """Start the thread that imports Prefect (``load_flow``) and runs the flow (which
    attaches)."""

    def target() -> None:
        try:
            upload_stream = load_flow()
            startup.mark("Prefect imported")
            upload_stream(**params)
        except BaseException as exc:  # noqa: BLE001 - the run stops with it (AttachJob)
            link.fail(exc)
            if link.state is LinkState.FAILED:
                logger.error("the flow run could not be created: %s: %s",
                             type(exc).__name__, exc)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    thread = threading.Thread(target=target, name="prefect-flow-run", daemon=True)
    thread.start()
    return thread


def run_with_late_flow_run(params: Mapping[str, Any], girder: Any, prepared: Any, *,
                           load_flow: Callable[[], Callable[..., Any]],
                           plain_uploads: Callable[..., Any] | None = None,
                           api_url: str | None = None) -> dict[str, Any]:
    """Run the session now, in this thread, and its flow run beside it (the module's
    docstring); returns the session's summary. ``load_flow``: imports Prefect and returns
    the flow (called in the background thread; given by the command line, which sits
    above the flow, so that this module does not import it); ``plain_uploads``: the pool
    of the units before the flow run exists (default ``ThreadUploads``); ``api_url``: the
    Prefect API's (the registry fallback is read from it before consuming)."""
    from girder_upload_stream.loop.session import run_session
    from girder_upload_stream.loop.executor import ThreadUploads

    link = FlowRunLink()
    # Under the names the flow's body looks it up by (its girder_api_url parameter).
    _register(params.get("girder_api_url"), params["topic_name"], link)
    thread = _flow_run_thread(params, link, load_flow)
    try:
        hooks = late_hooks(link, plain_uploads or ThreadUploads, api_url=api_url)
        summary = run_session(params, girder, hooks, prepared)
    except BaseException as exc:
        link.end(error=exc)  # the flow run, if it comes, fails with it
        raise
    else:
        link.end(summary)
    finally:
        # Left registered: a flow run that comes after the end returns at once.
        if not link.abandoned:  # let the flow run record its final state
            thread.join(timeout=timings.current().flow_run_start_seconds)
    return summary
