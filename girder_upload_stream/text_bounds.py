"""Make text that came in a message safe to write anywhere: bounded and on one line.

A message's key, names and error texts are the sender's choice: a megabyte key, a file
name holding a newline (a forged log line), terminal escape sequences. Every such piece
of text that reaches a log line, a registry cell, an artifact, a log-topic message or an
exception goes through :func:`bounded` first:

* control characters (C0, DEL, C1, the Unicode line and paragraph separators and the
  bidirectional overrides) are written as escapes (``\\n``, ``\\x1b``, ``\\u202e``), so
  one message can never make two lines, nor hide or reorder what follows;
* beyond ``limit`` characters (``LIMIT``, 200, unless the caller says otherwise) the
  text is cut, and what was cut is named by its length and the start of its sha256,
  e.g. ``aaaa...[+1048376 chars, sha256 3f9a0c12d4e5]``: two different long names stay
  told apart, and the digest can be checked against the message in the dead-letter
  topic or Kafka.

:func:`guard_log_records` applies the same treatment, with the larger ``LINE_LIMIT``,
to the message of every log record of the package's loggers (the pieces were bounded
before, this keeps any line from being split or forged), and masks the secrets that
show by their place (a URL's password, ``key=`` parameters: :mod:`redact`). Pure
standard library.
"""

from __future__ import annotations

import hashlib
import logging
import re

from girder_upload_stream.redact import redact_unknown

__all__ = ["LIMIT", "LINE_LIMIT", "bounded", "escape_controls", "guard_log_records"]

#: Characters of one piece of message text kept (a name, a key, a reason).
LIMIT = 200
#: Characters of one whole log line's message kept.
LINE_LIMIT = 4000

# C0 controls, DEL and C1 controls; U+2028/9 (line, paragraph separators) and the
# bidirectional embeddings, overrides and isolates (U+202A-E, U+2066-9).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_PACKAGE = "girder_upload_stream"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (one line)."""
    return _CONTROLS.sub(_escape, text)


def bounded(text: object, limit: int = LIMIT) -> str:
    """``text`` (a str, bytes or anything with ``str()``) escaped to one line and cut to
    about ``limit`` characters; a cut says how much was cut and gives a digest of the
    whole. Bytes that are not UTF-8 are shown with ``\\x..`` escapes."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        text = raw.decode("utf-8", errors="backslashreplace")
    else:
        text = str(text)
    if len(text) > limit:
        digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        head = escape_controls(text[:limit])[:limit]
        return f"{head}...[+{len(text) - limit} chars, sha256 {digest[:12]}]"
    return escape_controls(text)


def _is_package(name: str) -> bool:
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


def guard_log_records() -> None:
    """Make every record of the package's loggers carry an escaped, bounded message
    (whichever handler formats it: console, log file, log topic, Prefect's API): the
    record factory in place is wrapped once; records of other loggers are untouched."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "guards_text", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _is_package(record.name):
            record.msg = bounded(redact_unknown(record.getMessage()), LINE_LIMIT)
            record.args = ()
        return record

    factory.guards_text = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
