"""What the Prefect artifacts of a run say, built from registry rows: pure functions.

The keys, the table rows, the progress number and the end-of-run markdown are computed
here, with no Prefect import, so that they are unit-tested with nothing running;
:mod:`girder_upload_stream.prefect_glue.artifacts` publishes them and reads them back.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from girder_upload_stream.registry.tables import STATUS_IN_PROGRESS, InProgressRow, ProcessedRow
from girder_upload_stream.text_bounds import bounded

__all__ = [
    "KEY_PREFIX", "RECENT_UPLOADS_LIMIT", "IN_PROGRESS_LIMIT", "ArtifactKeys", "key_slug",
    "artifact_keys", "in_progress_table", "recent_uploads_table", "progress_percent",
    "progress_description", "RunFacts", "summary_markdown", "fallback_keys",
]

KEY_PREFIX = "gus"
#: Rows of the recent-uploads table: enough to cover what a restart reads again (the
#: files settled just before the committed offsets), small enough to store every version.
RECENT_UPLOADS_LIMIT = 200
#: Rows of the in-progress table; failed rows come first, so they are the last cut.
IN_PROGRESS_LIMIT = 500
_SLUG_MAX = 40
_HASH_CHARS = 8
_KEY_SUFFIXES = ("in-progress", "recent-uploads", "progress", "summary")
_COUNTER_LABELS = {
    "messages_read": "messages read", "bytes_read": "bytes read",
    "messages_processed": "messages processed", "bytes_processed": "bytes processed",
    "files_uploaded": "files uploaded", "files_skipped": "files skipped (already in Girder)",
    "files_failed": "files failed", "messages_rejected": "messages rejected",
    "files_found_in_girder": "files found in Girder when read again",
    "messages_skipped": "messages skipped (done before a restart)",
}
# Characters that make Markdown formatting or HTML; file names come from the topic and
# may be hostile, so they are shown literally.
#: Characters of one markdown cell kept (a path, a reason), cut with a digest beyond.
CELL_LIMIT = 300
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#!&])")


class ArtifactKeys(NamedTuple):
    """The four artifact keys of one topic and consumer group."""

    in_progress: str
    recent_uploads: str
    progress: str
    summary: str


def key_slug(text: str, max_len: int = _SLUG_MAX) -> str:
    """``text`` reduced to what an artifact key allows (``[a-z0-9-]``), for readability
    only: accents are dropped, every other run of characters becomes one dash."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-")


def artifact_keys(topic: str, group: str) -> ArtifactKeys:
    """Stable artifact keys of ``topic``/``group``: ``gus-<slug>-<hash8>-<what>``.

    The slug makes a key readable in the UI, but two names can share a slug (``a.b``
    and ``a_b``, or long names cut at the same place); the hash of the exact pair keeps
    their keys apart. The pair is hashed as JSON, so no separator can be forged."""
    digest = hashlib.sha256(json.dumps([topic, group]).encode()).hexdigest()[:_HASH_CHARS]
    base = "-".join(part for part in (KEY_PREFIX, key_slug(f"{topic}-{group}"), digest)
                    if part)
    return ArtifactKeys(*(f"{base}-{suffix}" for suffix in _KEY_SUFFIXES))


def _when(value: datetime) -> str:
    return value.isoformat(sep=" ", timespec="seconds")


def in_progress_table(rows: Iterable[InProgressRow],
                      limit: int = IN_PROGRESS_LIMIT) -> list[dict[str, Any]]:
    """Rows of the in-progress table artifact: failed files first (they need someone's
    attention; files still arriving resolve themselves), each with its reason."""
    ordered = sorted(rows, key=lambda row: row.status == STATUS_IN_PROGRESS)  # stable
    return [{"filename": row.filename, "rel_filepath": row.rel_filepath.as_posix(),
             "status": row.status, "n_chunks": row.n_chunks,
             "first_message": _when(row.first_message),
             "most_recent_message": _when(row.most_recent_message),
             "generation": row.generation, "reason": str(row.extra.get("reason", ""))}
            for row in ordered[:limit]]


def recent_uploads_table(rows: Sequence[ProcessedRow],
                         limit: int = RECENT_UPLOADS_LIMIT) -> list[dict[str, Any]]:
    """Rows of the recent-uploads table artifact: the last ``limit`` processed rows,
    newest first, with the outcome, sha256 and Girder item id from the row's extras.
    ``rel_filepath`` and ``generation`` are what :func:`fallback_keys` reads back."""
    newest = list(rows)[-limit:] if limit > 0 else []
    return [{"filename": row.filename, "rel_filepath": row.rel_filepath.as_posix(),
             "n_chunks": row.n_chunks, "first_message": _when(row.first_message),
             "processed_at": _when(row.processed_at), "generation": row.generation,
             "outcome": str(row.extra.get("outcome", "")),
             "sha256": str(row.extra.get("sha256", "")),
             "item_id": str(row.extra.get("item_id", ""))}
            for row in reversed(newest)]


def progress_percent(messages_read: int, lag: int | None) -> float | None:
    """``100 * read / (read + lag)``, one decimal; None when the lag is unknown.

    100 means caught up: a positive lag is shown as 99.9 at most, never rounded up, and
    nothing read with nothing behind (an empty topic) is 100."""
    if lag is None or lag < 0 or messages_read < 0:
        return None
    total = messages_read + lag
    if total == 0:
        return 100.0
    percent = round(100.0 * messages_read / total, 1)
    return min(percent, 99.9) if lag > 0 else percent


def progress_description(topic: str, group: str, counters: Mapping[str, int],
                         lag: int | None, hops: Sequence[Mapping[str, Any]] = ()) -> str:
    """One line of counts beside the progress bar; it carries the run's progress by
    itself when the consumer group cannot tell its lag. ``hops``: rows ``{"hop",
    "topic", "group", "partition", "lag"}`` (loop/group_view.py ``hop_rows``), shown
    below as a table: the partitions this member of the group holds on each hop, and
    how far behind each one is."""
    behind = "lag unknown" if lag is None else f"{lag:,} message(s) behind"
    line = (f"{topic} by {group}: {counters.get('messages_read', 0):,} message(s) read, "
            f"{behind}; files uploaded {counters.get('files_uploaded', 0):,}, skipped "
            f"{counters.get('files_skipped', 0):,}, failed {counters.get('files_failed', 0):,}")
    if not hops:
        return line
    table = ["| hop | topic | group | partition | lag |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {_cell(row['hop'])} | {_cell(row['topic'])} | {_cell(row['group'])} | "
              f"{'none' if row['partition'] is None else row['partition']} | "
              f"{'unknown' if row['lag'] is None else format(row['lag'], ',')} |"
              for row in hops]
    return "\n".join([line, "", "This member's partitions:", "", *table])


@dataclass(frozen=True)
class RunFacts:
    """The numbers and places the end-of-run summary reports."""

    topic: str
    group: str
    counters: Mapping[str, int]
    pending_messages: int
    elapsed_seconds: float
    registry_folder: str
    registry_files: Sequence[str] = ()
    host: str = ""
    stopped_because: str = ""


def _cell(value: Any) -> str:
    text = " ".join(bounded(value, CELL_LIMIT).split())  # no line breaks inside a table cell
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _code(value: Any) -> str:
    # A path reads best as code; one holding a backtick cannot be, so it is escaped.
    text = " ".join(bounded(value, CELL_LIMIT).split())
    return f"`{text}`" if "`" not in text else _cell(text)


def _failed_section(rows: Sequence[InProgressRow], max_failed: int) -> list[str]:
    failed = [row for row in rows if row.status != STATUS_IN_PROGRESS]
    lines = [f"## Failed files: {len(failed)}", ""]
    if not failed:
        return lines + ["None.", ""]
    lines += ["| file | status | reason |", "| --- | --- | --- |"]
    lines += [f"| {_cell(row.rel_filepath.as_posix())} | {_cell(row.status)} | "
              f"{_cell(row.extra.get('reason', '')) or 'unknown'} |"
              for row in failed[:max_failed]]
    if len(failed) > max_failed:
        lines.append(f"\n... and {len(failed) - max_failed} more, listed in the "
                     "in-progress registry.")
    return lines + [""]


def summary_markdown(facts: RunFacts, in_progress_rows: Sequence[InProgressRow] = (),
                     max_failed: int = 100) -> str:
    """The end-of-run markdown: the counters, the messages left pending, the failed
    files with their reasons, files still incomplete, and where the CSV registries are
    (on which host: the flow may run on a worker far from the person reading)."""
    stopped = f"Stopped: {_cell(facts.stopped_because)}. " if facts.stopped_because else ""
    lines = [f"# girder-upload-stream: {_cell(facts.topic)} by {_cell(facts.group)}", "",
             f"{stopped}Ran {facts.elapsed_seconds:.1f} s.", "",
             "| count | value |", "| --- | --- |"]
    for name, value in facts.counters.items():
        label = _COUNTER_LABELS.get(name) or _cell(name.replace("_", " "))
        lines.append(f"| {label} | {value:,} |")
    lines += [f"| pending messages (read again by the next run) | {facts.pending_messages:,} |",
              ""]
    lines += _failed_section(in_progress_rows, max_failed)
    incomplete = sum(row.status == STATUS_IN_PROGRESS for row in in_progress_rows)
    if incomplete:
        lines += [f"{incomplete} file(s) still incomplete: their messages stay "
                  "uncommitted and are read again by the next run of the group.", ""]
    host = f" on host {_code(facts.host)}" if facts.host else ""
    lines += ["## Registries", "", f"In {_code(facts.registry_folder)}{host}:", ""]
    lines += [f"* {_code(name)}" for name in facts.registry_files]
    return "\n".join(lines) + "\n"


def _records(data: Any) -> list[Any]:
    if isinstance(data, (str, bytes, bytearray)):
        try:
            data = json.loads(data)
        except ValueError:
            return []
    if isinstance(data, Mapping):  # a table given column by column
        return [{"rel_filepath": path, "generation": generation} for path, generation
                in zip(data.get("rel_filepath") or [], data.get("generation") or [])]
    return data if isinstance(data, list) else []


def fallback_keys(data: Any) -> set[tuple[str, str]]:
    """The ``(rel_filepath, generation)`` pairs of a recent-uploads table artifact's data
    (as stored by Prefect: a JSON string of row dicts, or already decoded). Rows without
    a generation are left out: they could never match a chunk read again."""
    keys = set()
    for record in _records(data):
        if not isinstance(record, Mapping):
            continue
        path, generation = record.get("rel_filepath"), record.get("generation")
        if isinstance(path, str) and path and isinstance(generation, str) and generation:
            keys.add((path, generation))
    return keys
