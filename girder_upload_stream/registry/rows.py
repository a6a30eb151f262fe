"""Rows, file names and sidecar-joined file I/O of the registries (see
:mod:`girder_upload_stream.registry.tables`, which re-exports the public names)."""

from __future__ import annotations

import logging
import re
import shutil
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, NamedTuple

from girder_upload_stream.registry.csv_files import (
    Column, RegistryFormatError, RegistryIssue, append_table, atomic_write_bytes,
    check_header, check_literal, parse_table, render_table)

__all__ = [
    "STATUS_IN_PROGRESS", "STATUS_FAILED", "STATUS_MISMATCHED_HASH", "IN_PROGRESS_STATUSES",
    "MAX_ROWS_PER_FILE", "RowKey", "InProgressRow", "ProcessedRow", "LoadResult",
    "ConsolidationResult", "IN_PROGRESS_COLUMNS", "PROCESSED_COLUMNS",
    "in_progress_path", "seed_in_progress_path", "processed_path", "processed_part_path",
    "sidecar_path", "part_pattern", "part_files", "load_rows", "save_rows", "append_rows",
    "preserve_copy",
]

log = logging.getLogger(__name__)

STATUS_IN_PROGRESS = "in_progress"
STATUS_FAILED = "failed"
STATUS_MISMATCHED_HASH = "mismatched_hash"
IN_PROGRESS_STATUSES = frozenset({STATUS_IN_PROGRESS, STATUS_FAILED, STATUS_MISMATCHED_HASH})
#: Rows per per-worker processed file before it rolls over (OpenMSIStream's cap).
MAX_ROWS_PER_FILE = 1000

IN_PROGRESS_COLUMNS: tuple[Column, ...] = (
    ("filename", "str"), ("rel_filepath", "path"), ("status", "str"), ("n_chunks", "int"),
    ("first_message", "datetime"), ("most_recent_message", "datetime"))
PROCESSED_COLUMNS: tuple[Column, ...] = (
    ("filename", "str"), ("rel_filepath", "path"), ("n_chunks", "int"),
    ("first_message", "datetime"), ("processed_at", "datetime"))
_IDENTITY = ("filename", "rel_filepath", "n_chunks", "first_message")
_SIDECAR_COLUMNS: tuple[Column, ...] = (
    ("filename", "str"), ("rel_filepath", "path"), ("n_chunks", "int"),
    ("first_message", "datetime"), ("generation", "str"), ("extra", "literal"))
_SIDECAR_SUFFIX = ".extra"
_WORKER_RE = re.compile(r"[A-Za-z0-9.-]+")


class RowKey(NamedTuple):
    """What identifies one file: its relative path and a generation key chosen by the
    caller (e.g. its hash); ``""`` for rows read from OpenMSIStream's own files."""

    rel_filepath: PurePosixPath
    generation: str


def _naive_second(value: datetime) -> datetime:
    # The format has one-second resolution in naive local time (as OpenMSIStream's
    # datetime.now()); normalizing here makes a row equal to its reloaded self.
    if type(value) is datetime and value.tzinfo is None and not value.microsecond:
        return value  # already normalized: the common case when loading
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    if value.tzinfo is not None:
        value = value.astimezone().replace(tzinfo=None)
    # Rebuilt rather than .replace(): also drops subclasses such as pandas.Timestamp.
    return datetime(value.year, value.month, value.day,
                    value.hour, value.minute, value.second)


def _normalize_row(row: Any, time_fields: Sequence[str]) -> None:
    """Validate and normalize a row in place (rows are frozen, hence object.__setattr__)."""
    if not isinstance(row.filename, str) or not isinstance(row.generation, str):
        raise TypeError("filename and generation must be str")
    if not isinstance(row.rel_filepath, (str, PurePath)) or str(row.rel_filepath) in ("", "."):
        raise ValueError(f"rel_filepath must name a file, got {row.rel_filepath!r}")
    if type(row.n_chunks) is not int or row.n_chunks < 0:
        raise ValueError(f"n_chunks must be an int >= 0, got {row.n_chunks!r}")
    check_literal(dict(row.extra))
    object.__setattr__(row, "rel_filepath", PurePosixPath(str(row.rel_filepath)))
    object.__setattr__(row, "extra", dict(row.extra))
    for name in time_fields:
        object.__setattr__(row, name, _naive_second(getattr(row, name)))


@dataclass(frozen=True)
class InProgressRow:
    """A file being rebuilt, or whose rebuild failed (``status``)."""

    filename: str
    rel_filepath: PurePosixPath
    status: str
    n_chunks: int
    first_message: datetime
    most_recent_message: datetime
    generation: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.status not in IN_PROGRESS_STATUSES:
            raise ValueError(f"status must be one of {sorted(IN_PROGRESS_STATUSES)}, "
                             f"got {self.status!r}")
        _normalize_row(self, ("first_message", "most_recent_message"))

    @property
    def key(self) -> RowKey:
        """The table key: (rel_filepath, generation)."""
        return RowKey(self.rel_filepath, self.generation)


@dataclass(frozen=True)
class ProcessedRow:
    """A file processed (uploaded, or found in Girder already) at ``processed_at``."""

    filename: str
    rel_filepath: PurePosixPath
    n_chunks: int
    first_message: datetime
    processed_at: datetime
    generation: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _normalize_row(self, ("first_message", "processed_at"))

    @property
    def key(self) -> RowKey:
        """The table key: (rel_filepath, generation)."""
        return RowKey(self.rel_filepath, self.generation)


class LoadResult(NamedTuple):
    """Rows read from registry files, and the problems met (bad lines were skipped)."""

    rows: list[Any]
    issues: list[RegistryIssue]


class ConsolidationResult(NamedTuple):
    """Outcome of :func:`consolidate`: the merged file, how many rows it gained, the
    files merged into it (now deleted) and the problems met."""

    path: Path
    n_added: int
    merged: list[Path]
    issues: list[RegistryIssue]


# ---------------------------------------------------------------- file names


def _check_name_part(what: str, value: str) -> str:
    # Topic and group become part of a file name: nothing that could leave the folder.
    if not value or "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
        raise ValueError(f"{what} {value!r} cannot be used in a registry file name")
    return value


def in_progress_path(folder: Path, topic: str, group: str) -> Path:
    """The in-progress table we write: the name OpenMSIStream 1.8.8 itself writes and
    reads back, so that it finds our failed and in-progress rows after a switch back."""
    return Path(folder) / (f"consuming_from_{_check_name_part('topic', topic)}"
                           f"_in_progress_by_{_check_name_part('group', group)}.csv")


def seed_in_progress_path(folder: Path, topic: str, group: str) -> Path:
    """The in-progress table under the name the OpenMSIStream documentation gives, which
    earlier versions of this project wrote: read, merged and retired (see
    :meth:`~girder_upload_stream.registry.tables.InProgressTable.open`)."""
    return Path(folder) / (f"consuming_from_{_check_name_part('topic', topic)}"
                           f"_by_{_check_name_part('group', group)}_in_progress.csv")


def processed_path(folder: Path, topic: str, group: str) -> Path:
    """The consolidated processed table (same name as OpenMSIStream's)."""
    return Path(folder) / (f"processed_from_{_check_name_part('topic', topic)}"
                           f"_by_{_check_name_part('group', group)}.csv")


def processed_part_path(folder: Path, topic: str, group: str, worker: str,
                        part: int) -> Path:
    """One worker's processed file number ``part``; matches OpenMSIStream's consolidation
    glob ``processed_from_{topic}_by_{group}*.csv``, so it can merge them too."""
    if not _WORKER_RE.fullmatch(worker):
        raise ValueError(f"worker id {worker!r} must match {_WORKER_RE.pattern}")
    base = processed_path(folder, topic, group)
    return base.with_name(f"{base.stem}_{worker}_part{part:04d}.csv")


def sidecar_path(path: Path) -> Path:
    """Where the extra fields of the rows of registry file ``path`` are kept."""
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def part_pattern(folder: Path, topic: str, group: str) -> re.Pattern[str]:
    """File names of per-worker processed files: ours (groups ``worker`` and ``part``)
    and OpenMSIStream's per-thread ones (``_t{thread id}.csv``, rolled over as
    ``_t{thread id}_{secs}_{fraction}.csv``).

    Stricter than OpenMSIStream's glob, which would also swallow the files of another
    group whose name merely starts with ``group``.
    """
    stem = re.escape(processed_path(folder, topic, group).stem)
    return re.compile(
        rf"{stem}_(?:(?P<worker>[A-Za-z0-9.-]+)_part(?P<part>\d+)|t\d+(?:_\d+_\d+)?)\.csv")


def part_files(folder: Path, topic: str, group: str) -> list[Path]:
    """The per-worker processed files present in ``folder``, sorted by name."""
    pattern = part_pattern(folder, topic, group)
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir()
                  if pattern.fullmatch(p.name) and p.is_file())


# ---------------------------------------------------------------- one file with sidecar


def _load_extras(path: Path) -> tuple[dict[tuple, deque] | None, list[RegistryIssue]]:
    """Sidecar entries by row identity, in file order; None if there is no usable sidecar
    (normal for files OpenMSIStream wrote)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None, []
    try:
        parsed, issues = parse_table(side, _SIDECAR_COLUMNS)
    except RegistryFormatError as exc:
        return None, [RegistryIssue(side, None, f"sidecar ignored: {exc}")]
    extras: dict[tuple, deque] = {}
    for _, values in parsed:
        identity = tuple(values[name] for name in _IDENTITY)
        extras.setdefault(identity, deque()).append((values["generation"], values["extra"]))
    return extras, issues


def load_rows(path: Path, row_type: type, columns: Sequence[Column]) -> LoadResult:
    """Rows of one registry file joined with its sidecar; bad lines skipped and reported.

    Raises RegistryFormatError (from the main file only) when its header is wrong.
    """
    parsed, issues = parse_table(path, columns)
    extras, sidecar_issues = _load_extras(path)
    issues.extend(sidecar_issues)
    rows, unmatched = [], 0
    for number, values in parsed:
        queue = None if extras is None else extras.get(
            tuple(values[name] for name in _IDENTITY))
        if queue:
            generation, extra = queue.popleft()
        else:
            generation, extra = "", {}
            unmatched += extras is not None
        try:
            rows.append(row_type(**values, generation=generation, extra=extra))
        except (TypeError, ValueError) as exc:
            issues.append(RegistryIssue(path, number, f"skipped invalid row: {exc}"))
    issues.sort(key=lambda issue: (issue.path != path, issue.line or 0))  # file order
    if unmatched:  # a crash between the two writes, or a hand-edited main file
        issues.append(RegistryIssue(sidecar_path(path), None,
                                    f"no entry for {unmatched} row(s) of the main file; "
                                    "their generation and extra are unknown"))
    for issue in issues:
        log.warning("registry: %s", issue)
    return LoadResult(rows, issues)


def _values(rows: list[Any], columns: Sequence[Column]) -> list[dict[str, Any]]:
    return [{name: getattr(row, name) for name, _ in columns} for row in rows]


def save_rows(path: Path, rows: Iterable[Any], columns: Sequence[Column]) -> None:
    """Write one registry file and its sidecar, each atomically (sidecar first: the
    main file is authoritative, so a crash in between loses at most extras)."""
    rows = list(rows)
    atomic_write_bytes(sidecar_path(path),
                       render_table(_SIDECAR_COLUMNS, _values(rows, _SIDECAR_COLUMNS)))
    atomic_write_bytes(path, render_table(columns, _values(rows, columns)))


def append_rows(path: Path, rows: Iterable[Any], columns: Sequence[Column]) -> None:
    """Add rows at the end of a registry file and its sidecar, each atomically, without
    parsing (or dropping) the lines already there.

    Raises RegistryFormatError, before writing anything, if ``path`` has another header.
    Sidecar first: after a crash in between, a retry appends its entries again, and
    the surplus copies match nothing.
    """
    rows = list(rows)
    if path.exists():
        check_header(path, columns)
    side = sidecar_path(path)
    try:
        append_table(side, _SIDECAR_COLUMNS, _values(rows, _SIDECAR_COLUMNS))
    except RegistryFormatError:  # an unreadable sidecar is useless: start a new one
        atomic_write_bytes(side, render_table(_SIDECAR_COLUMNS,
                                              _values(rows, _SIDECAR_COLUMNS)))
    append_table(path, columns, _values(rows, columns))


def preserve_copy(path: Path) -> None:
    """Keep a copy of a file whose bad lines are about to be dropped by a rewrite; the
    ``.malformed`` suffix keeps it out of every registry glob."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    shutil.copy2(path, path.with_name(f"{path.name}.{stamp}.malformed"))
