"""The long-running consumer loop: poll, reassemble, hand units to uploads, commit.

It imports no Prefect, Kafka or Girder module: the flow gives it a consumer group, a
``submit`` function that starts an upload unit (a Prefect task) and returns a handle,
and optional side jobs (registry saving, heartbeats, console). Polling never waits for
an upload: finished handles are collected each round, so a slow Girder cannot push
the consumer past ``max.poll.interval.ms``. Every commit goes through the run's
:class:`~girder_upload_stream.loop.checkpoint.Checkpoint`, whose docstring holds the
sequence of what must be durable first.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from girder_upload_stream import failpoints, startup, timings
from girder_upload_stream.errors import FatalError
from girder_upload_stream.loop.checkpoint import Checkpoint, UpstreamHop
from girder_upload_stream.retry_policy import classify
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import FileOutcome, RawMessage
from girder_upload_stream.settings import RunSettings
from girder_upload_stream.wire.codec import FileKey
from girder_upload_stream.ledger.units import UploadUnit, mark_moved
from girder_upload_stream.loop.rekey_book import raw_message

__all__ = ["UploadHandle", "ProbeHandle", "SideJob", "RunSummary", "StreamRunner", "StopSignal",
           "stop_on_signals", "DrivenHop"]

logger = logging.getLogger(__name__)


class StopSignal:
    """One run's stop request: set by its signal handlers, its console's "quit" or its
    caller; safe from signal handlers and other threads. Each run owns its own, so a
    second run in the same process (a test, a served deployment) starts fresh."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            logger.info("stop requested: %s", reason)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextmanager
def stop_on_signals(stop: StopSignal) -> Iterator[None]:
    """SIGINT and SIGTERM request a graceful stop of the run while inside (in the main
    thread only: elsewhere the process's handlers stay); the previous handlers come back
    at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: stop.request(signal.Signals(signum).name))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class UploadHandle(Protocol):
    def done(self) -> bool: ...
    def result(self) -> list[FileOutcome]: ...


class ProbeHandle(Protocol):
    """A running Girder lookup: ``result()`` gives ``[(file_key, found)]``."""

    def done(self) -> bool: ...
    def result(self) -> list[tuple[FileKey, bool | None]]: ...


class SideJob(Protocol):
    """Periodic work beside the loop (registries, heartbeats, console dots)."""

    def tick(self, runner: StreamRunner, final: bool = False) -> None: ...


@dataclass
class RunSummary:
    stopped_because: str = ""
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    pending_messages: int = 0
    active_seconds: float = 0.0  # from start to the last file put in Girder
    #: Why the last registry save failed (the recorder's ``save_error``); None if it
    #: worked. Offsets past files processed since the last good save stayed uncommitted.
    save_error: str | None = None
    #: Wall-clock time (epoch seconds) the first message was read; None if none was.
    first_message_at: float | None = None
    #: The most upload units (one per big file) running at the same time.
    max_uploads_in_flight: int = 0
    #: Chunks put off at --max_files_in_progress and not taken at the stop (rule 10).
    waiting_at_bound: int = 0


@runtime_checkable
class DrivenHop(UpstreamHop, Protocol):
    """An upstream hop the loop also drives (the re-key hop): stepped each round before
    this hop polls, asked whether it is idle, closed at shutdown. Its part of the commit
    (flush, commit, purge) is the checkpoint's (:class:`UpstreamHop`)."""

    def step(self) -> int: ...
    def idle(self) -> bool: ...
    def close(self) -> None: ...


class StreamRunner:
    """Drives one :class:`StreamProcessor` from a consumer group until asked to stop."""

    def __init__(self, settings: RunSettings, processor: StreamProcessor, group: Any,
                 submit: Callable[[UploadUnit], UploadHandle],
                 side_jobs: list[SideJob] | None = None,
                 save: Callable[[], bool] | None = None,
                 dead_letters: Callable[[], bool] | None = None,
                 upstream: Sequence[UpstreamHop] = (),
                 probe: Callable[[list[FileKey]], ProbeHandle] | None = None,
                 early_outcomes: Callable[[], list[tuple[int, FileOutcome]]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 stop: StopSignal | None = None) -> None:
        self.settings = settings
        self.stop = stop or StopSignal()
        self.processor = processor
        self.group = group
        self._submit = submit
        self.side_jobs = side_jobs or []
        # Steps 2 and 3 of the checkpoint: the dead letters acknowledged, the save.
        self.checkpoint = Checkpoint(processor.offsets, group, dead_letters=dead_letters,
                                     save=save, upstream=upstream)
        self._clock = clock
        self._probe = probe
        self._early_outcomes = early_outcomes
        self._handles: dict[int, tuple[UploadUnit, UploadHandle]] = {}
        self._probes: list[tuple[list[FileKey], ProbeHandle]] = []
        self._started = clock()
        self._last_message = self._started
        self._last_commit = self._started
        self.summary: RunSummary | None = None
        self.stopping_reason = ""
        self.fatal: FatalError | None = None  # an upload's: the run stops on it
        processor.stream_shared = lambda: bool(getattr(group, "shared", False))
        self.first_message_at: float | None = None  # wall clock, for the benchmarks
        self.max_uploads_in_flight = 0
        self._waiting_at_bound = 0
        #: ``--rekey_by_file``: the first hop (loop/rekey_hop.py), an upstream hop the
        #: loop also drives (:class:`DrivenHop`: stepped before this group, the second
        #: hop, polls); None: the group reads the source topic itself.
        self.rekey = next((hop for hop in upstream if isinstance(hop, DrivenHop)), None)

    # -- one round --------------------------------------------------------------------
    def step(self) -> int:
        """Poll once, process, submit, collect and maybe commit; returns messages read."""
        forwarded = self.rekey.step() if self.rekey is not None else 0
        messages = self.group.poll(self.processor.poll_size(self.settings.poll_batch),
                                   timeout=0.02 if forwarded else 0.2)
        if messages:
            startup.mark(startup.FIRST_MESSAGE)
            if self.first_message_at is None:
                self.first_message_at = time.time()
        for msg in messages:
            self.processor.handle(raw_message(msg) if self.rekey is not None else
                                  RawMessage(msg.topic(), msg.partition(), msg.offset(),
                                             msg.key(), msg.value()))
        for tp, offset in self.processor.offsets.take_seeks().items():
            if self.group.seek(tp, offset):  # over messages done before a restart (rule 8)
                self.processor.offsets.sought(tp, offset)
        if messages or forwarded or not self.group.assignment:
            # Idle time only counts while partitions are assigned (joining can take seconds).
            self._last_message = self._clock()
        for unit in self.processor.take_units():
            unit.shared = bool(getattr(self.group, "shared", False))
            unit.alone = unit.shared and self._alone(unit)
            self._handles[unit.unit_id] = (unit, self._submit(unit))
        self.max_uploads_in_flight = max(self.max_uploads_in_flight, len(self._handles))
        self._start_probes()
        self.collect()
        # Pausing only helps while uploads are pending (finishing them frees memory):
        # files still assembling need more messages, so pausing then would wait for ever.
        # The files' share of the budget (memory_plan.py), as for spilling.
        budget = self.processor.memory_budget_bytes or self.settings.memory_budget_bytes
        self.group.pause(self.processor.bytes_held > budget and not self.processor.idle)
        if self._clock() - self._last_commit >= self.settings.commit_interval_seconds:
            self.commit()
        for job in self.side_jobs:
            job.tick(self)
        return len(messages)

    def _start_probes(self) -> None:
        keys = self.processor.take_probes()
        if not keys:
            return
        if self._probe is None:  # nowhere to look: the files assemble as usual
            for key in keys:
                self.processor.probe_result(key, False)
            return
        self._probes.append((keys, self._probe(keys)))

    def _collect_probes(self) -> None:
        still = []
        for keys, handle in self._probes:
            if not handle.done():
                still.append((keys, handle))
                continue
            try:
                answers = handle.result()
            except Exception as exc:  # noqa: BLE001 - asked again after retry_delay
                logger.warning("Girder lookup of %d re-read file(s) failed: %s", len(keys), exc)
                answers = [(key, None) for key in keys]
            for key, found in answers:
                self.processor.probe_result(key, found)
        self._probes = still

    @property
    def busy(self) -> bool:
        """True while uploads or Girder lookups are running."""
        return bool(self._handles or self._probes)

    def collect(self) -> None:
        """Settle every file reported as landed, every finished upload unit and Girder
        lookup (never blocks)."""
        if self._early_outcomes is not None:
            for unit_id, outcome in self._early_outcomes():
                self.processor.settle_early(unit_id, outcome)
                self._note_first_file()
        self._collect_probes()
        for unit_id, (unit, handle) in list(self._handles.items()):
            if not handle.done():
                continue
            del self._handles[unit_id]
            try:
                outcomes = handle.result()
            except Exception as exc:  # the unit raised: its files are tried again later
                logger.warning("upload unit %d failed (%s): %s", unit_id,
                               classify(exc).value, exc)
                self.processor.fail_unit(unit, f"{type(exc).__name__}: {exc}")
                if isinstance(exc, FatalError) and self.fatal is None:
                    self.fatal = exc  # the run stops (see _stop_reason)
            else:
                failpoints.hit("upload.done")
                self.processor.finish_unit(unit, outcomes)
                self._note_first_file()

    def _note_first_file(self) -> None:
        """The start-up timeline's last mark, once a file is in Girder."""
        c = self.processor.counters
        if c.files_uploaded + c.files_skipped + c.files_skipped_different + \
                c.files_found_in_girder:
            startup.mark(startup.FIRST_FILE)

    def _alone(self, unit: UploadUnit) -> bool:
        """Whether no other member of the group can be uploading ``unit``'s files: every
        pending message of each was written after this member gained its partition (a
        group re-keyed by file only, kafka/gain_marks.py)."""
        gains = getattr(self.group, "gains", None)
        if gains is None or not gains.keyed_by_file:
            return False
        records = [self.processor.ledger.get(key) for key in unit.file_keys]
        return all(r is not None and gains.alone(r.pending.where) for r in records)

    def commit(self) -> None:
        """A commit round of the loop: :meth:`Checkpoint.commit` (the upstream hops'
        flush, commit and purge included)."""
        self._last_commit = self._clock()
        self.checkpoint.commit()

    def on_revoke(self, tps: list[tuple[str, int]]) -> None:
        """Before losing partitions: commit what is safe for them (synchronously,
        :meth:`Checkpoint.revoke`), hand the files that only they hold to the next
        owner, then forget them."""
        self.checkpoint.revoke(tps)
        self._drop(tps)

    def on_lost(self, tps: list[tuple[str, int]]) -> None:
        """Partitions were taken away without a revoke (the session timed out): another
        member may own them already and have committed past our progress, so nothing is
        committed for them. Their files waiting for upload are handed over and their
        pending offsets forgotten, as for a revoke; the new owner reads them again from
        the group's last commit (files already in Girder are recognised there)."""
        self._drop(tps)

    def _drop(self, tps: list[tuple[str, int]]) -> None:
        self.processor.abandon_streams("partitions revoked or lost")
        self.processor.hand_over(tps)
        self.processor.offsets.forget(tps)
        for unit, _ in self._handles.values():
            mark_moved(unit)  # the next owner may upload its files at the same moment

    # -- the loop --------------------------------------------------------------------
    def _stop_reason(self) -> str | None:
        now = self._clock()
        if self.fatal is not None:
            return f"error: {self.fatal}"
        if self.stop.is_set():
            return "stop requested"
        limit = self.settings.max_runtime_seconds
        if limit is not None and now - self._started >= limit:
            return f"max_runtime_seconds ({limit:g}) reached"
        idle = self.settings.max_idle_seconds
        if (idle is not None and now - self._last_message >= idle and self.processor.idle
                and not self.busy and (self.rekey is None or self.rekey.idle())):
            # A broker that did not answer lately, or messages still waiting, is not
            # idleness: the idle time counts from the broker's last problem.
            quiet = getattr(self.group, "quiet_seconds", lambda: float("inf"))()
            if quiet < idle:
                self._last_message = now - quiet
            elif getattr(self.group, "caught_up", lambda: True)():
                return f"no new message for {idle:g}s and nothing in flight"
            else:
                self._last_message = now
        return None

    def run(self) -> RunSummary:
        """Loop until a stop condition, then shut down gracefully (see :meth:`shutdown`).

        An exception (e.g. Prefect's TerminationSignal on SIGTERM or cancellation) also
        shuts down gracefully before it propagates; :attr:`summary` is then set. A
        :class:`FatalError` an upload met (a root folder given by id that is gone) stops
        the run too, gracefully, without raising (no traceback in a flow run's log):
        :attr:`fatal` holds it and the summary's reason names it."""
        reason = None
        try:
            while reason is None:
                self.step()
                reason = self._stop_reason()
        except BaseException as exc:  # a Prefect TerminationSignal is a BaseException
            reason = f"interrupted ({type(exc).__name__})"
            self.shutdown(reason)
            raise
        return self.shutdown(reason)

    def shutdown(self, reason: str) -> RunSummary:
        """Stop fetching, let in-flight uploads finish (bounded), commit what is safe,
        run the side jobs a last time and leave the group. The group is left even when
        a step before fails, so that its partitions move on at once."""
        logger.info("shutting down: %s", reason)
        self.stopping_reason = reason  # the side jobs' final tick may report it
        try:
            self.group.pause(True)
            deadline = self._clock() + timings.current().shutdown_grace_seconds
            while self.busy and self._clock() < deadline:
                self.group.poll(1, timeout=0.1)  # keep the group membership alive
                self.collect()
            self.processor.close_streams(timeout=5.0)
            if self._handles:
                logger.warning("%d upload unit(s) still running at shutdown; their messages "
                               "stay uncommitted and are read again on restart",
                               len(self._handles))
            # Counted before the group's close, which forgets the put-off chunks.
            self._waiting_at_bound = self.processor.offsets.put_off_count()
            if self._waiting_at_bound:  # offsets rule 10
                logger.warning("%d chunk(s) of files beyond --max_files_in_progress still "
                               "wait, uncommitted: the next run of the group reads them "
                               "again", self._waiting_at_bound)
            self.commit()
            self._final_ticks()
        finally:
            try:
                self.group.close()
            finally:
                if self.rekey is not None:
                    self.rekey.close()  # flush, commit, leave the source's group
        save_error = getattr(self.processor.recorder, "save_error", None)
        if save_error is not None:
            logger.error("the last save of the registries failed (%s): the offsets of "
                         "files processed since the last good save stay uncommitted and "
                         "are read again on restart", save_error)
        self.summary = RunSummary(reason, self._clock() - self._started,
                                  {k: v for k, v in vars(self.processor.counters).items()
                                   if not k.startswith("_")},
                                  self.processor.offsets.pending_count(),
                                  (self.processor.last_settled_at or self._started)
                                  - self._started, save_error, self.first_message_at,
                                  self.max_uploads_in_flight, self._waiting_at_bound)
        return self.summary

    def _final_ticks(self) -> None:
        """Every side job's last tick; one failing does not skip the others."""
        for job in self.side_jobs:
            try:
                job.tick(self, final=True)
            except Exception as exc:  # noqa: BLE001 - shutdown goes on
                logger.error("%s failed at shutdown: %s: %s", type(job).__name__,
                             type(exc).__name__, exc)
