"""The registries as Prefect artifacts, and the latest one read back on a bare machine.

For a topic and consumer group, with ``K = gus-<slug>-<hash8>`` (see
:func:`~girder_upload_stream.registry.artifact_content.artifact_keys`):

* ``K-in-progress``: table of the files being rebuilt or failed, with the reason;
* ``K-recent-uploads``: table of the last 200 files processed, newest first;
* ``K-progress``: progress of the run, ``100 * read / (read + lag)``, described by the
  counts and a table of the partitions this member holds on each hop, with their lag;
* ``K-summary``: markdown written when the run ends.

Every publish of a keyed table or markdown adds a version (a row) to the Prefect
database, and every publish or update an event (about 6 KiB with its indexes and
resources), so :class:`ArtifactPublisher` publishes a table only when its content changed
since its last publish, at most every :data:`TABLES_INTERVAL_SECONDS` (a version of the
recent-uploads table of 200 rows is about 40 KiB), and always at the end; the progress
artifact is created once per run and then updated in place, at most every
:data:`PROGRESS_INTERVAL_SECONDS` (people watching a console have the progress line).

:func:`load_registry_fallback` reads the latest recent-uploads table back, for a restart
whose logs folder has no registry (another machine): its files' re-read chunks are then
known to be done. Prefect is imported only inside the functions that call it;
:func:`read_registry_fallback_over_http` reads the same artifact with one plain HTTP
request, for a command-line run that starts consuming before Prefect is imported.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from girder_upload_stream.loop.group_view import hop_rows, hop_views
from girder_upload_stream.registry.artifact_content import (
    RECENT_UPLOADS_LIMIT, RunFacts, artifact_keys, fallback_keys, in_progress_table,
    progress_description, progress_percent, recent_uploads_table, summary_markdown)
from girder_upload_stream.registry.tables import (STATUS_IN_PROGRESS, ProcessedRow, ProcessedTable,
                                           in_progress_path, processed_path)

__all__ = ["Publication", "publish_to_prefect", "in_flow_run", "ArtifactPublisher",
           "load_registry_fallback", "read_registry_fallback_over_http", "MAX_BACKOFF_SECONDS", "TABLES_INTERVAL_SECONDS",
           "PROGRESS_INTERVAL_SECONDS", "FAILURES_CHECK_SECONDS"]

logger = logging.getLogger(__name__)

#: Longest wait between two attempts while the Prefect API keeps failing.
MAX_BACKOFF_SECONDS = 600.0
#: Seconds between two versions of a table that changed (every 30 s, the recent-uploads
#: table alone grew the Prefect database by ~9 MiB an hour at 2 files/s).
TABLES_INTERVAL_SECONDS = 300.0
#: Seconds between two updates of the progress artifact (each one is an event).
PROGRESS_INTERVAL_SECONDS = 60.0
#: Seconds between two looks for new failures: a file that fails (or fails again for
#: another reason) shows in the in-progress artifact within this time, not only at the
#: next table interval -- that is the day someone opens the UI. Files merely arriving
#: and leaving do not count, so a steady stream adds no versions.
FAILURES_CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class Publication:
    """One call to make to the Prefect API: ``kind`` is ``table``, ``markdown`` or
    ``progress`` (which updates ``artifact_id`` when given, else creates)."""

    kind: str
    key: str
    data: Any
    description: str
    artifact_id: Any = None


def publish_to_prefect(pub: Publication) -> Any:
    """Create (or, for progress with an id, update) the artifact; returns its id.

    ``_sync=True``: the runner loop is synchronous, even if some caller has a loop."""
    from prefect import artifacts

    if pub.kind == "table":
        return artifacts.create_table_artifact(pub.data, key=pub.key,
                                               description=pub.description, _sync=True)
    if pub.kind == "markdown":
        return artifacts.create_markdown_artifact(pub.data, key=pub.key,
                                                  description=pub.description, _sync=True)
    if pub.kind == "progress" and pub.artifact_id is None:
        return artifacts.create_progress_artifact(pub.data, key=pub.key,
                                                  description=pub.description, _sync=True)
    if pub.kind == "progress":
        return artifacts.update_progress_artifact(pub.artifact_id, pub.data,
                                                  description=pub.description, _sync=True)
    raise ValueError(f"unknown artifact kind {pub.kind!r}")


def in_flow_run() -> bool:
    """True inside a Prefect flow run; artifacts made outside one belong to no run (and
    Prefect deprecates them), so the runner used without Prefect publishes nothing."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


class _RecentWindow:
    """The newest processed rows across part files: ``ProcessedTable.rows()`` holds
    only the current part, which starts empty again every 1,000 rows."""

    def __init__(self, limit: int) -> None:
        self._rows: deque[ProcessedRow] = deque(maxlen=limit)
        self._path: Path | None = None
        self._seen = 0

    def update(self, table: ProcessedTable) -> None:
        rows, path = table.rows(), table.path
        if path != self._path:
            # A new part: rows the old one got after the previous update are missed
            # (one interval's worth at most); the window is a cache, not the registry.
            self._path, self._seen = path, 0
        known = set(self._rows)
        self._rows.extend(row for row in rows[self._seen:] if row not in known)
        self._seen = len(rows)

    def rows(self) -> list[ProcessedRow]:
        return list(self._rows)


def _group_lag(group: Any) -> int | None:
    # ConsumerGroup.lag() may not exist, or may not know yet (no assignment, no
    # watermark): progress then keeps its last value, and the counts say the rest.
    method = getattr(group, "lag", None)
    if not callable(method):
        return None
    try:
        value = method()
    except Exception as exc:  # noqa: BLE001 - progress is informative only
        logger.debug("consumer group lag unknown: %s", exc)
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _counters(runner: Any) -> dict[str, int]:
    return {name: value for name, value in vars(runner.processor.counters).items()
            if not name.startswith("_")}


def _stopped_because(runner: Any) -> str:
    # StreamRunner sets ``summary`` only after the final tick; ``stopping_reason`` is
    # read in case the runner offers the reason before it (not there yet: then the
    # summary simply says nothing about why the run stopped).
    summary = getattr(runner, "summary", None)
    if summary is not None:
        return summary.stopped_because
    return str(getattr(runner, "stopping_reason", "") or "")


class ArtifactPublisher:
    """Runner side job that keeps the run's Prefect artifacts up to date.

    ``publish`` (default :func:`publish_to_prefect`), ``active`` (default
    :func:`in_flow_run`) and ``clock`` are injectable (for tests, and for a run whose
    flow run came later: prefect_glue/late_flow_run.py, which gives ``started`` too). ``tick`` never raises
    an ``Exception`` into the loop: a failure is logged, and the next attempt waits
    longer each time (up to :data:`MAX_BACKOFF_SECONDS`) so that a Prefect API that is
    down does not slow every round of the loop with its retries."""

    def __init__(self, recorder: Any, topic: str, group: str,
                 interval_seconds: float = TABLES_INTERVAL_SECONDS,
                 *, progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
                 publish: Callable[[Publication], Any] = publish_to_prefect,
                 active: Callable[[], bool] = in_flow_run,
                 clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.recorder, self.topic, self.group = recorder, topic, group
        self.keys = artifact_keys(topic, group)
        self.interval, self.progress_interval = interval_seconds, progress_interval_seconds
        self._publish, self._active, self._clock = publish, active, clock
        self._enabled: bool | None = None  # decided at the first due tick
        # When the run started (``clock`` time; default now): the summary's duration.
        self._started = clock() if started is None else started
        # Tables wait one interval: a short run publishes each once, at its end.
        self._tables_at = self._started + interval_seconds
        self._progress_at = self._started
        self._failures_at = self._started + FAILURES_CHECK_SECONDS
        self._shown_failures: frozenset = frozenset()  # in the last in-progress version
        # An empty recent-uploads table is never published: as the latest version it
        # would hide the previous run's rows from load_registry_fallback.
        self._published: dict[str, Any] = {self.keys.recent_uploads: []}
        self._recent = _RecentWindow(RECENT_UPLOADS_LIMIT)
        self._progress_id: Any = None
        self._progress: tuple[float, str] = (0.0, "")
        self._failures = 0
        self.publications = 0  # API calls made, for tests and benchmarks

    def tick(self, runner: Any, final: bool = False) -> None:
        """Publish what is due: progress every ``progress_interval_seconds``, changed
        tables every ``interval_seconds``, everything (and the summary) when ``final``."""
        now = self._clock()
        tables_due = final or now >= self._tables_at
        progress_due = final or now >= self._progress_at
        failures_due = now >= self._failures_at
        if not (tables_due or progress_due or failures_due) or self._enabled is False:
            return
        try:
            if self._enabled is None:
                self._enabled = bool(self._active())
                if not self._enabled:
                    logger.debug("no Prefect flow run: artifacts are not published")
                    return
            if progress_due:
                self._progress_at = now + self.progress_interval
                self._publish_progress(runner)
            if tables_due:
                self._tables_at = now + self.interval
                self._publish_tables()
            elif failures_due:
                self._failures_at = now + FAILURES_CHECK_SECONDS
                if self._failure_reasons() != self._shown_failures:
                    self._publish_in_progress()
            if final:
                self._publish_summary(runner)
        except Exception as exc:  # noqa: BLE001 - artifacts must never stop the stream
            self._failures += 1
            delay = min(MAX_BACKOFF_SECONDS, self.interval * 2 ** min(self._failures - 1, 20))
            self._tables_at = self._progress_at = self._failures_at = now + delay
            logger.warning("could not publish the Prefect artifacts of %s/%s (%s: %s); "
                           "next attempt in %.0f s", self.topic, self.group,
                           type(exc).__name__, exc, delay)
        else:
            self._failures = 0

    def _send(self, pub: Publication) -> Any:
        result = self._publish(pub)
        self.publications += 1
        return result

    def _publish_if_changed(self, kind: str, key: str, data: Any, description: str) -> None:
        if self._published.get(key) == data:
            return
        self._send(Publication(kind, key, data, description))
        self._published[key] = data  # only once it is published: a failure retries it

    def _failure_reasons(self, rows: Any = None) -> frozenset:
        """What the in-progress registry (or ``rows`` of it) says went wrong: (file,
        reason) pairs."""
        rows = self.recorder.in_progress.rows() if rows is None else rows
        return frozenset((row.rel_filepath, str(row.extra.get("reason")))
                         for row in rows if row.extra.get("reason"))

    def _publish_in_progress(self) -> None:
        rows = self.recorder.in_progress.rows()
        failed = sum(row.status != STATUS_IN_PROGRESS for row in rows)
        table = in_progress_table(rows)
        shown = "" if len(table) == len(rows) else f" (the first {len(table)} shown)"
        self._publish_if_changed(
            "table", self.keys.in_progress, table,
            f"Files of {self.topic} by {self.group} in progress ({len(rows) - failed}) or "
            f"failed ({failed}){shown}; registry in {self.recorder.folder}")
        self._shown_failures = self._failure_reasons(rows)

    def _publish_tables(self) -> None:
        self._publish_in_progress()
        self._recent.update(self.recorder.processed)
        recent = recent_uploads_table(self._recent.rows())
        if recent:
            self._publish_if_changed(
                "table", self.keys.recent_uploads, recent,
                f"The last {len(recent)} file(s) of {self.topic} by {self.group} put in "
                "Girder or found there, newest first")

    def _publish_progress(self, runner: Any) -> None:
        counters = _counters(runner)
        lag = _group_lag(runner.group)
        percent = progress_percent(counters.get("messages_read", 0), lag)
        if percent is None:
            percent = self._progress[0]
        description = progress_description(self.topic, self.group, counters, lag,
                                           hop_rows(hop_views(runner)))
        if self._progress_id is None:
            self._progress_id = self._send(Publication("progress", self.keys.progress,
                                                       percent, description))
        elif (percent, description) != self._progress:
            self._send(Publication("progress", self.keys.progress, percent, description,
                                   self._progress_id))
        self._progress = (percent, description)

    def _publish_summary(self, runner: Any) -> None:
        folder, topic, group = Path(self.recorder.folder), self.topic, self.group
        facts = RunFacts(
            topic, group, _counters(runner), runner.processor.offsets.pending_count(),
            self._clock() - self._started, str(folder.resolve()),
            (in_progress_path(folder, topic, group).name,
             processed_path(folder, topic, group).name),
            socket.gethostname(), _stopped_because(runner))
        self._send(Publication("markdown", self.keys.summary,
                               summary_markdown(facts, self.recorder.in_progress.rows()),
                               f"End of a run of {topic} by {group}"))


def load_registry_fallback(topic: str, group: str) -> set[tuple[str, str]]:
    """``{(rel_filepath, generation)}`` of the latest recent-uploads artifact of
    ``topic``/``group``; empty if there is none or the Prefect API cannot be read.

    For a restart without local registries: those files' chunks, read again above the
    committed offsets, are then done at once instead of rebuilt and checked in Girder.
    Missing knowledge costs only that check, so no error here is fatal."""
    key = artifact_keys(topic, group).recent_uploads
    try:
        from prefect.artifacts import Artifact

        artifact = Artifact.get(key, _sync=True)
    except Exception as exc:  # noqa: BLE001 - Kafka offsets and Girder still suffice
        logger.warning("could not read the Prefect artifact %s (%s: %s); resuming from "
                       "Kafka offsets and Girder alone", key, type(exc).__name__, exc)
        return set()
    if artifact is None:
        logger.info("no Prefect artifact %s: no processed file known beforehand", key)
        return set()
    keys = fallback_keys(artifact.data)
    logger.info("%d processed file(s) known from the Prefect artifact %s", len(keys), key)
    return keys


def _auth_headers() -> dict[str, str]:
    """Prefect's own ways to authenticate, from the environment: ``PREFECT_API_KEY``
    (Prefect Cloud, a bearer token) or ``PREFECT_API_AUTH_STRING`` (a server's basic
    authentication). Never logged."""
    if os.environ.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {os.environ['PREFECT_API_KEY']}"}
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}


def read_registry_fallback_over_http(api_url: str, topic: str, group: str,
                                     timeout: float = 10.0) -> set[tuple[str, str]] | None:
    """What :func:`load_registry_fallback` returns, read with one request to the Prefect
    REST API (``GET /artifacts/{key}/latest``) instead of through Prefect, whose import
    takes seconds; None when it could not be read (the caller may ask Prefect later)."""
    key = artifact_keys(topic, group).recent_uploads
    url = f"{api_url.rstrip('/')}/artifacts/{urllib.parse.quote(key)}/latest"
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   **_auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            data = json.load(answer).get("data")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            logger.info("no Prefect artifact %s: no processed file known beforehand", key)
            return set()
        logger.warning("could not read the Prefect artifact %s (HTTP %d); it is read "
                       "through Prefect once the flow run exists", key, exc.code)
        return None
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
        logger.warning("could not read the Prefect artifact %s (%s: %s); it is read "
                       "through Prefect once the flow run exists", key, type(exc).__name__,
                       getattr(exc, "reason", exc))
        return None
    keys = fallback_keys(data)
    logger.info("%d processed file(s) known from the Prefect artifact %s", len(keys), key)
    return keys
