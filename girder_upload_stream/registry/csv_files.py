"""OpenMSIStream "DataclassTable" CSV text, read safely, and written crash-safely.

The layout below was measured on files written by openmsistream 1.8.8 and is reproduced
byte for byte (the tests compare with files its own ``DataclassTable`` wrote):

* UTF-8; lines joined by ``\\n``; no newline after the last line; no BOM, no comment
  lines, no index column. (OpenMSIStream on Windows puts a ``sep=;`` line first; it is
  accepted when reading and never written.)
* Line 1: the field names joined by ``;``. A header-only file is an empty table.
* One line per row: every value is ``repr()`` of the value (strings quoted, ints bare);
  datetimes are the ``repr`` of ``strftime("%a %b %d, %Y at %H:%M:%S")`` (English names,
  one-second resolution, naive local time); paths are the ``repr`` of their string. The
  values are joined by :mod:`csv` with ``;``, ``"`` as quote character, minimal quoting
  and doubled quotes: a value holding ``;`` or ``"`` is wrapped in ``"`` with inner ``"``
  doubled (``"'a;b'"``). ``repr`` escapes line breaks and control characters, so a row is
  always one physical line whatever the file name holds.

Reading never evaluates code: values go through :func:`ast.literal_eval` and a strict
datetime pattern. A bad row becomes a :class:`RegistryIssue` and is skipped; only a file
without the expected header raises :class:`RegistryFormatError`.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import io
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

__all__ = [
    "Column", "RegistryIssue", "RegistryFormatError", "ParsedRow",
    "format_datetime", "parse_datetime", "check_literal",
    "header_line", "render_rows", "render_table", "append_table", "check_header",
    "parse_table",
    "atomic_write_bytes",
]

DELIMITER = ";"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DATETIME_RE = re.compile(
    rf"(?:{'|'.join(_DAYS)}) ({'|'.join(_MONTHS)}) (\d{{1,2}}), (\d{{4}}) "
    r"at (\d{2}):(\d{2}):(\d{2})")
_KINDS = frozenset({"str", "path", "int", "datetime", "literal"})

#: (field name, kind); kind is one of "str", "path", "int", "datetime", "literal".
Column = tuple[str, str]
#: One parsed row: its 1-based line number in the file and its values by field name.
ParsedRow = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class RegistryIssue:
    """A problem found while reading a registry file; ``line`` is None for the whole file."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class RegistryFormatError(ValueError):
    """A registry file that cannot be read at all (missing or unexpected header)."""


def format_datetime(value: datetime) -> str:
    """``value`` as OpenMSIStream's ``"%a %b %d, %Y at %H:%M:%S"``, always in English.

    Built by hand rather than with strftime so the process locale can never change it.
    """
    return (f"{_DAYS[value.weekday()]} {_MONTHS[value.month - 1]} {value.day:02d}, "
            f"{value.year:04d} at {value.hour:02d}:{value.minute:02d}:{value.second:02d}")


@functools.lru_cache(maxsize=4096)  # the same second recurs in many rows and files
def parse_datetime(text: str) -> datetime:
    """Inverse of :func:`format_datetime` (locale-independent; the weekday is not checked
    against the date because it carries no information of its own)."""
    match = _DATETIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a registry datetime: {text!r}")
    month, day, year, hour, minute, second = match.groups()
    return datetime(int(year), _MONTHS.index(month) + 1, int(day),
                    int(hour), int(minute), int(second))


def check_literal(value: Any) -> None:
    """Raise ValueError unless ``repr(value)`` reads back equal through literal_eval.

    Guards the free-form ``extra`` fields: only plain data (None, bool, int, finite
    float, str, bytes, and lists, tuples and str-keyed dicts of these) can be stored.
    """
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):  # repr gives 'nan'/'inf', which literal_eval refuses
            raise ValueError(f"non-finite float {value!r} cannot be stored")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_literal(item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"dict keys must be str, got {key!r}")
            check_literal(item)
        return
    raise ValueError(f"{type(value).__name__} values cannot be stored: {value!r}")


def _encode(kind: str, value: Any) -> str:
    if kind == "datetime":
        return repr(format_datetime(value))
    if kind == "path":
        return repr(str(value))
    return repr(value)


def _plain_string(text: str) -> str | None:
    """The value of a quoted string literal without backslashes or inner quotes (what
    ``repr`` gives for almost every file name), or None: spares the parser for most
    fields, which makes loading several times faster."""
    if (len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            and "\\" not in text and text[0] not in text[1:-1]):
        return text[1:-1]
    return None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a Python literal: {text[:80]!r}") from exc


def _decode(kind: str, text: str) -> Any:
    """One value from its field text; ValueError says what is wrong with it."""
    if kind == "int":
        value = int(text) if text.isascii() and text.isdigit() else _literal(text)
        if type(value) is not int:
            raise ValueError(f"expected an integer, got {text[:80]!r}")
        return value
    if kind == "literal":
        return {} if text == "{}" else _literal(text)
    value = _plain_string(text)
    if value is None:
        value = _literal(text)
        if not isinstance(value, str):
            raise ValueError(f"expected a quoted string, got {text[:80]!r}")
    return parse_datetime(value) if kind == "datetime" else value


def header_line(columns: Sequence[Column]) -> str:
    """The first line of a file holding ``columns``."""
    return DELIMITER.join(name for name, _ in columns)


def render_rows(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> str:
    """The row lines (values by field name), joined by newlines, without the header."""
    # One csv writer with these settings quotes exactly as OpenMSIStream's per-line
    # writer: values are reprs, which never hold the line terminator's characters.
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=DELIMITER, quotechar='"',
                        quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerows([_encode(kind, row[name]) for name, kind in columns] for row in rows)
    return buffer.getvalue().removesuffix("\n")


def render_table(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> bytes:
    """The whole file's bytes: header line, then one line per row."""
    body = render_rows(columns, rows)
    return (header_line(columns) + ("\n" + body if body else "")).encode("utf-8")


def append_table(path: Path, columns: Sequence[Column],
                 rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically rewrite ``path`` as its current bytes plus ``rows``, leaving every
    existing line as it is (so nothing needs parsing); a missing file is created.

    Raises RegistryFormatError if the existing file has another header.
    """
    if path.exists():
        check_header(path, columns)
        existing = path.read_bytes()
    else:
        existing = header_line(columns).encode("utf-8")
    body = render_rows(columns, rows).encode("utf-8")
    atomic_write_bytes(path, existing.rstrip(b"\r\n") + b"\n" + body if body else existing)


def _parse_line(columns: Sequence[Column], line: str) -> dict[str, Any]:
    if '"' not in line:  # nothing quoted, so no value holds the delimiter
        fields = line.split(DELIMITER)
    else:
        try:
            fields = next(csv.reader([line], delimiter=DELIMITER, quotechar='"',
                                     strict=True))
        except (csv.Error, StopIteration) as exc:
            raise ValueError(f"unreadable CSV line ({exc})") from exc
    if len(fields) != len(columns):
        raise ValueError(f"expected {len(columns)} fields, found {len(fields)}")
    values = {}
    for (name, kind), text in zip(columns, fields, strict=True):
        try:
            values[name] = _decode(kind, text)
        except ValueError as exc:
            raise ValueError(f"field {name!r}: {exc}") from None
    return values


def _split_lines(data: bytes) -> list[tuple[int, str | None]]:
    """(line number, text or None if not UTF-8) for every line, header included."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM added by a spreadsheet program
    result: list[tuple[int, str | None]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            result.append((number, raw.decode("utf-8").removesuffix("\r")))
        except UnicodeDecodeError:
            result.append((number, None))
    return result


def _check_header(path: Path, lines: list[tuple[int, str | None]],
                  columns: Sequence[Column]) -> int:
    """Index of the header in ``lines`` (1 after OpenMSIStream's Windows ``sep=;``
    line); raises RegistryFormatError if it does not name exactly ``columns``."""
    start = 1 if lines and lines[0][1] == f"sep={DELIMITER}" else 0
    number, header = lines[start] if len(lines) > start else (start + 1, "")
    if header is None or header.strip() != header_line(columns):
        raise RegistryFormatError(f"{path}:{number}: header {header!r} is not the "
                                  f"expected {header_line(columns)!r}")
    return start


def check_header(path: Path, columns: Sequence[Column]) -> None:
    """Raise RegistryFormatError unless the file at ``path`` starts with the header of
    ``columns``."""
    with path.open("rb") as stream:
        head = [stream.readline().rstrip(b"\n") for _ in range(2)]
    _check_header(path, _split_lines(b"\n".join(head)), columns)


def parse_table(path: Path, columns: Sequence[Column]
                ) -> tuple[list[ParsedRow], list[RegistryIssue]]:
    """Read a registry file: its good rows, and one issue per skipped line.

    Raises RegistryFormatError when the header is missing or names other fields: then
    nothing in the file can be trusted to mean what the columns say.
    """
    lines = _split_lines(path.read_bytes())
    start = _check_header(path, lines, columns)
    rows: list[ParsedRow] = []
    issues: list[RegistryIssue] = []
    for number, line in lines[start + 1:]:
        if line is not None and not line.strip():
            continue  # blank lines carry nothing (OpenMSIStream never writes them)
        try:
            if line is None:
                raise ValueError("not valid UTF-8")
            rows.append((number, _parse_line(columns, line)))
        except ValueError as exc:
            issues.append(RegistryIssue(path, number, f"skipped malformed line: {exc}"))
    return rows, issues


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers only ever see a complete file.

    The bytes go to a temporary file in the same folder (a hidden name ending in
    ``.tmp``, so no registry glob ever matches it), are fsynced, and then renamed over
    the target with :func:`os.replace`; on any failure the previous file stays as it was.
    Like OpenMSIStream's files (made via mkstemp), the result has mode 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: PurePath) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on folders.
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
