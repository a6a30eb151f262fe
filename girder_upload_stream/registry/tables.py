"""The consumer's registries: files in progress and files processed, as OpenMSIStream CSV.

Pure module (stdlib and pandas only). Files live in the registry folder (OpenMSIStream:
``{output_dir}/LOGS``) and are named after the topic and the consumer group:

* ``consuming_from_{topic}_in_progress_by_{group}.csv``: one row per file being rebuilt,
  or whose rebuild failed (``failed``, ``mismatched_hash``); rewritten as rows change.
  It is the name OpenMSIStream 1.8.8 writes and reads back, so a user switching to it
  keeps every row. The name the OpenMSIStream documentation gives (and earlier versions
  of this project wrote), ``consuming_from_{topic}_by_{group}_in_progress.csv``, is read
  too: its rows are merged in, and it is deleted once they are saved under our name.
* ``processed_from_{topic}_by_{group}.csv``: one row per file processed, per time it was
  produced, merged by :func:`consolidate` (at start and at shutdown) from per-worker files
  ``processed_from_{topic}_by_{group}_{worker}_part{NNNN}.csv`` of at most 1,000 rows.

The files are exactly OpenMSIStream's ``DataclassTable`` format (see
:mod:`girder_upload_stream.registry.csv_files`), whose reader refuses a header with extra
columns. Our own fields (``generation``, and the free-form ``extra`` dict for restart
logic) therefore live in a sidecar beside each file, ``<file name>.extra`` (not
``.extra.csv``: OpenMSIStream merges every ``processed_from_{topic}_by_{group}*.csv`` at
start and would stop on the sidecar's header). The main file is authoritative: sidecar
rows attach to main rows with the same (filename, rel_filepath, n_chunks, first_message),
in order, so a lost, stale or hand-edited sidecar only loses extras, never rows.

Every write is atomic (temporary file, fsync, ``os.replace``): the files can be copied
and read at any time. Callers throttle saving (every few seconds) using ``dirty``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import fields
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from girder_upload_stream.registry.csv_files import RegistryFormatError, RegistryIssue
from girder_upload_stream.registry.rows import (
    IN_PROGRESS_COLUMNS, IN_PROGRESS_STATUSES, MAX_ROWS_PER_FILE, PROCESSED_COLUMNS,
    STATUS_FAILED, STATUS_IN_PROGRESS, STATUS_MISMATCHED_HASH, ConsolidationResult,
    InProgressRow, LoadResult, ProcessedRow, RowKey, append_rows, in_progress_path,
    load_rows, part_files, part_pattern, preserve_copy, processed_part_path,
    processed_path, save_rows, seed_in_progress_path, sidecar_path)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "STATUS_IN_PROGRESS", "STATUS_FAILED", "STATUS_MISMATCHED_HASH", "IN_PROGRESS_STATUSES",
    "MAX_ROWS_PER_FILE", "RowKey", "InProgressRow", "ProcessedRow", "RegistryIssue",
    "RegistryFormatError", "LoadResult", "ConsolidationResult",
    "in_progress_path", "seed_in_progress_path", "processed_path", "processed_part_path",
    "sidecar_path", "InProgressTable", "ProcessedTable", "consolidate", "read_processed",
    "load_processed_keys", "rows_to_dataframe",
]

log = logging.getLogger(__name__)


def _as_key(key: tuple) -> RowKey:
    # Accept any (path-like, generation) pair; keys hold PurePosixPath like the rows.
    rel_filepath, generation = key
    return RowKey(PurePosixPath(str(rel_filepath)), generation)


def _line_issues_in(issues: Iterable[RegistryIssue], path: Path) -> bool:
    return any(issue.path == path and issue.line is not None for issue in issues)


class InProgressTable:
    """Files being rebuilt or failed, keyed by :class:`RowKey` (path and generation).

    Thread-safe. ``update``/``remove`` only change memory and set ``dirty``; ``save``
    writes the whole table atomically. Rows keep their first position when updated.
    ``issues`` lists what loading the file skipped or could not match.

    ``merge_from`` names other tables of the same files (another program's name for
    this one): their rows are merged in (for a key in both, the row with the later
    ``most_recent_message`` wins, ties going to ``path``), and they are deleted by the
    first save that worked, so that their rows live on in ``path`` only.
    """

    def __init__(self, path: Path, *, merge_from: Iterable[Path] = ()) -> None:
        self.path = Path(path)
        self.issues: list[RegistryIssue] = []
        self._rows: dict[RowKey, InProgressRow] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # keeps snapshots written in order
        if self.path.is_file():
            self._load(self.path)
        self._retire = [Path(p) for p in merge_from
                        if Path(p) != self.path and Path(p).is_file()]
        for other in list(self._retire):
            self._merge(other)
        # Written at the first save: a table that does not exist yet, or rows merged in.
        self._dirty = not self.path.is_file() or bool(self._retire)
        self._keep_copy = _line_issues_in(self.issues, self.path)

    @classmethod
    def open(cls, folder: Path, topic: str, group: str) -> InProgressTable:
        """The table of ``topic``/``group`` in ``folder`` under OpenMSIStream 1.8.8's name,
        with the rows of the documented name (earlier versions of ours) merged in."""
        return cls(in_progress_path(folder, topic, group),
                   merge_from=[seed_in_progress_path(folder, topic, group)])

    def _load(self, source: Path) -> None:
        result = load_rows(source, InProgressRow, IN_PROGRESS_COLUMNS)
        self.issues.extend(result.issues)
        for row in result.rows:
            if row.key in self._rows:
                issue = RegistryIssue(source, None,
                                      f"duplicate row for {row.key}; the later one is kept")
                log.warning("registry: %s", issue)
                self.issues.append(issue)
            self._rows[row.key] = row

    def _merge(self, source: Path) -> None:
        try:
            result = load_rows(source, InProgressRow, IN_PROGRESS_COLUMNS)
        except RegistryFormatError as exc:  # not a table we can read: left alone
            self.issues.append(RegistryIssue(source, None, f"not merged: {exc}"))
            log.warning("registry: %s not merged: %s", source, exc)
            self._retire.remove(source)
            return
        self.issues.extend(result.issues)
        added = 0
        for row in result.rows:
            mine = self._rows.get(row.key)
            if mine is None or row.most_recent_message > mine.most_recent_message:
                added += mine is None
                self._rows[row.key] = row
        log.info("registry: %d row(s) of %s merged into %s (%d new)", len(result.rows),
                 source.name, self.path.name, added)

    def drop_superseded(self, processed: Iterable[ProcessedRow]) -> int:
        """Drop rows whose file the processed table lists as processed at or after the
        row's last message (rows a merge brought back, or rows without a generation that
        another program left): same path, and the same generation unless one of them has
        none. Returns how many rows were dropped."""
        latest: dict[tuple[PurePosixPath, str], datetime] = {}
        for row in processed:
            for key in ((row.rel_filepath, row.generation), (row.rel_filepath, "")):
                if key not in latest or row.processed_at > latest[key]:
                    latest[key] = row.processed_at
        with self._lock:
            gone = [key for key, row in self._rows.items()
                    if (done := latest.get((row.rel_filepath, row.generation))) is not None
                    and done >= row.most_recent_message]
            for key in gone:
                del self._rows[key]
            self._dirty = self._dirty or bool(gone)
        return len(gone)

    @property
    def dirty(self) -> bool:
        """True when memory holds changes not yet saved."""
        return self._dirty

    def update(self, row: InProgressRow) -> None:
        """Insert the row, or replace the row with the same key."""
        if not isinstance(row, InProgressRow):
            raise TypeError(f"expected an InProgressRow, got {type(row).__name__}")
        with self._lock:
            self._rows[row.key] = row
            self._dirty = True

    def remove(self, key: RowKey) -> InProgressRow | None:
        """Drop a row (e.g. when its file is processed); returns it, or None if absent."""
        with self._lock:
            row = self._rows.pop(_as_key(key), None)
            self._dirty = self._dirty or row is not None
            return row

    def remove_processed(self, key: RowKey) -> None:
        """The file of ``key`` is processed: drop its row, and a row of its path without a
        generation (another program's, which keeps none), as :meth:`drop_superseded`
        does at start for rows older than a processed one."""
        self.remove(key)
        if key.generation:
            self.remove(RowKey(key.rel_filepath, ""))

    def get(self, key: RowKey) -> InProgressRow | None:
        """The row with this key, or None."""
        with self._lock:
            return self._rows.get(_as_key(key))

    def rows(self) -> list[InProgressRow]:
        """A snapshot of all rows, in table order."""
        with self._lock:
            return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    def save(self, force: bool = False) -> bool:
        """Write the table if it changed (or ``force``); returns whether it wrote."""
        with self._save_lock:
            with self._lock:
                if not (self._dirty or force):
                    return False
                rows, self._dirty = list(self._rows.values()), False
            try:
                if self._keep_copy:  # the rewrite drops the bad lines: keep them aside
                    preserve_copy(self.path)
                    self._keep_copy = False
                save_rows(self.path, rows, IN_PROGRESS_COLUMNS)
                self._retire_merged()
            except BaseException:
                with self._lock:
                    self._dirty = True
                raise
            return True

    def _retire_merged(self) -> None:
        """Delete the tables merged in, now that their rows are saved in ours (one with
        lines that could not be read is first copied aside)."""
        while self._retire:
            source = self._retire[0]
            if _line_issues_in(self.issues, source):
                preserve_copy(source)
            source.unlink(missing_ok=True)
            sidecar_path(source).unlink(missing_ok=True)
            log.info("registry: %s retired, its rows are in %s", source.name, self.path.name)
            self._retire.pop(0)

    def to_dataframe(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame (e.g. for a Prefect table artifact)."""
        return rows_to_dataframe(self.rows(), InProgressRow)


class ProcessedTable:
    """One worker's processed rows, in files of at most ``max_rows`` rows.

    Each table starts a new part file (never appending to an old one); when the current
    part is full the next ``add`` writes it out and rolls to the next part. ``worker``
    must be unique among the writers of one topic/group (it names the files).
    """

    def __init__(self, folder: Path, topic: str, group: str, worker: str, *,
                 max_rows: int = MAX_ROWS_PER_FILE) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        processed_part_path(folder, topic, group, worker, 0)  # validates all the names
        self.folder, self.topic, self.group, self.worker = Path(folder), topic, group, worker
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: list[ProcessedRow] = []
        self._n_saved = 0
        self._part = self._next_free_part()

    @property
    def path(self) -> Path:
        """The current part file (it may not exist until the first save)."""
        return processed_part_path(self.folder, self.topic, self.group, self.worker,
                                   self._part)

    @property
    def dirty(self) -> bool:
        """True when rows were added since the last save."""
        return len(self._rows) > self._n_saved

    def _next_free_part(self) -> int:
        # Numbers of this worker's parts still on disk (not consolidated yet) are skipped.
        pattern = part_pattern(self.folder, self.topic, self.group)
        used = [int(match["part"]) for path in part_files(self.folder, self.topic, self.group)
                if (match := pattern.fullmatch(path.name)) and match["worker"] == self.worker]
        return max(used, default=0) + 1

    def add(self, row: ProcessedRow) -> None:
        """Append a row; a full current part is written and a new part begun first.

        Never raises for the file system: if the full part cannot be written (full
        disk), the row joins it in memory and the part is written, longer than
        ``max_rows``, by the next save that works (the caller learns of the failure
        from that save)."""
        if not isinstance(row, ProcessedRow):
            raise TypeError(f"expected a ProcessedRow, got {type(row).__name__}")
        with self._lock:
            if len(self._rows) >= self.max_rows:
                try:
                    self._write_locked()
                except OSError as exc:
                    log.debug("full processed part %s not written yet: %s", self.path, exc)
                else:
                    self._part, self._rows, self._n_saved = self._part + 1, [], 0
            self._rows.append(row)

    def rows(self) -> list[ProcessedRow]:
        """A snapshot of the rows of the current part."""
        with self._lock:
            return list(self._rows)

    def save(self, force: bool = False) -> bool:
        """Write the current part if rows were added (or ``force``); returns whether it
        wrote. An empty table writes nothing (no empty part files)."""
        with self._lock:
            if self._n_saved and not self.path.exists():
                # consolidate() merged this part away: only unsaved rows still need a file
                self._rows, self._n_saved = self._rows[self._n_saved:], 0
                self._part = self._next_free_part()
            if not self._rows or not (self.dirty or force):
                return False
            self._write_locked()
            return True

    def _write_locked(self) -> None:
        save_rows(self.path, self._rows, PROCESSED_COLUMNS)
        self._n_saved = len(self._rows)

    def to_dataframe(self) -> pd.DataFrame:
        """The current part's rows as a pandas DataFrame."""
        return rows_to_dataframe(self.rows(), ProcessedRow)


def _read_parts(folder: Path, topic: str, group: str
                ) -> tuple[list[ProcessedRow], list[Path], list[RegistryIssue]]:
    """Rows of all readable per-worker files, in processing order; the files read; and
    the issues (a part with a bad header is reported and left alone)."""
    rows: list[ProcessedRow] = []
    read: list[Path] = []
    issues: list[RegistryIssue] = []
    for part in part_files(folder, topic, group):
        try:
            result = load_rows(part, ProcessedRow, PROCESSED_COLUMNS)
        except RegistryFormatError as exc:
            issues.append(RegistryIssue(part, None, f"left unmerged: {exc}"))
            continue
        rows.extend(result.rows)
        issues.extend(result.issues)
        read.append(part)
    rows.sort(key=lambda row: row.processed_at)  # stable: ties keep file order
    return rows, read, issues


def read_processed(folder: Path, topic: str, group: str) -> LoadResult:
    """All processed rows of ``topic``/``group`` (consolidated file, then per-worker
    files), without changing any file. Raises RegistryFormatError if the consolidated
    file has a wrong header."""
    target = processed_path(folder, topic, group)
    base = (load_rows(target, ProcessedRow, PROCESSED_COLUMNS) if target.is_file()
            else LoadResult([], []))
    rows, _, issues = _read_parts(folder, topic, group)
    return LoadResult(base.rows + rows, base.issues + issues)


def load_processed_keys(folder: Path, topic: str, group: str) -> set[RowKey]:
    """The (rel_filepath, generation) of every processed file, for restart decisions."""
    return {row.key for row in read_processed(folder, topic, group).rows}


def consolidate(folder: Path, topic: str, group: str) -> ConsolidationResult:
    """Merge every per-worker processed file of ``topic``/``group`` into the single
    ``processed_from_{topic}_by_{group}.csv`` and delete them (duplicates are kept: a
    file produced twice appears twice).

    Call it when no :class:`ProcessedTable` of this topic/group is writing (at start and
    after shutdown). The merged file's lines are kept as they are (its rows are appended
    to, not parsed: cheap however long it grows); a part with skipped bad lines is first
    copied to ``*.{timestamp}.malformed``. Raises RegistryFormatError, changing nothing,
    if the merged file has a wrong header. A crash after the merged file is written but
    before the parts are deleted merges those parts again next time (as OpenMSIStream).
    """
    target = processed_path(folder, topic, group)
    rows, merged, issues = _read_parts(folder, topic, group)
    if merged:
        for path in merged:
            if _line_issues_in(issues, path):
                preserve_copy(path)
        append_rows(target, rows, PROCESSED_COLUMNS)  # the existing rows stay unparsed
        for part in merged:
            part.unlink(missing_ok=True)
            sidecar_path(part).unlink(missing_ok=True)
    _remove_orphan_sidecars(folder, topic, group)
    return ConsolidationResult(target, len(rows), merged, issues)


def _remove_orphan_sidecars(folder: Path, topic: str, group: str) -> None:
    # Sidecars of parts merged by someone else (OpenMSIStream deletes only the .csv).
    pattern = part_pattern(folder, topic, group)
    if not Path(folder).is_dir():
        return
    for path in Path(folder).iterdir():
        base = path.name.removesuffix(".extra")
        if base != path.name and pattern.fullmatch(base) and not path.with_name(base).exists():
            path.unlink(missing_ok=True)


def rows_to_dataframe(rows: Iterable[InProgressRow | ProcessedRow],
                      row_type: type) -> pd.DataFrame:
    """Rows as a DataFrame with one column per field (paths as POSIX strings), also when
    there are no rows."""
    import pandas as pd  # imported here: only artifact building needs pandas

    names = [f.name for f in fields(row_type)]
    records = [{name: getattr(row, name) for name in names} for row in rows]
    for record in records:
        record["rel_filepath"] = str(record["rel_filepath"])
    frame = pd.DataFrame.from_records(records, columns=names)
    for name, kind in (IN_PROGRESS_COLUMNS if row_type is InProgressRow
                       else PROCESSED_COLUMNS):
        if kind == "datetime":
            frame[name] = pd.to_datetime(frame[name])
    return frame

