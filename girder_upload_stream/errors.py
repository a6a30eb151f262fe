"""Exception hierarchy shared by every part of girder-upload-stream.

Two branches tell a caller what to do with a failure:

* :class:`TransientError` -- the world is temporarily wrong (a broker or server is
  unreachable, a disk is full): retry later, do not commit the message offset. Two
  kinds of it say more: :class:`UnreachableError` (no answer at all) and
  :class:`AuthenticationError` (credentials refused); both stop a batch at once.
* :class:`TerminalError` -- the input itself is wrong (a malformed message, a file that
  fails its hash): record it and move on; retrying cannot help.

Every exception carries optional context (Kafka topic, partition, offset, the file's
relative path, and free-form details) and renders the fields that are set in ``str()``.
Modules written later (Kafka, Girder clients) add their own subclasses under these;
callers decide by class (:mod:`~girder_upload_stream.retry_policy`), never by message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from girder_upload_stream.text_bounds import LIMIT, bounded

__all__ = [
    "GirderUploadStreamError",
    "TransientError",
    "UnreachableError",
    "AuthenticationError",
    "TerminalError",
    "FatalError",
    "ChunkDecodeError",
    "FileRejectedError",
    "SourceFileChangedError",
    "StorageError",
    "ConfigError",
]

_CONTEXT_FIELDS = ("topic", "partition", "offset", "rel_path")
#: Characters of an error's message kept: it is built from bounded pieces of message
#: text (text_bounds.py) and our own words; this bounds what a caller forgot.
MESSAGE_LIMIT = 1000


class GirderUploadStreamError(Exception):
    """Root of every error raised on purpose by this project.

    ``message`` says what went wrong; the keyword context says where. Only the
    context fields that are set appear in ``str()``, e.g.
    ``chunk hash mismatch [topic='t', partition=2, offset=17, file='a/b.txt']``.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        rel_path: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        message = bounded(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.message = message
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.rel_path = rel_path
        self.details: dict[str, Any] = dict(details or {})

    def add_context(self, **context: Any) -> GirderUploadStreamError:
        """Fill in context fields that are still unset and return ``self``.

        Lets a caller that knows more (e.g. the Kafka offset) enrich an error raised
        deeper down before re-raising or recording it. Unknown names go to ``details``.
        """
        for name, value in context.items():
            if value is None:
                continue
            if name in _CONTEXT_FIELDS:
                if getattr(self, name) is None:
                    setattr(self, name, value)
            else:
                self.details.setdefault(name, value)
        return self

    @property
    def context(self) -> dict[str, Any]:
        """The context fields that are set, in display order (details last)."""
        found = {name: getattr(self, name) for name in _CONTEXT_FIELDS}
        found = {name: value for name, value in found.items() if value is not None}
        found.update({k: v for k, v in self.details.items() if v is not None})
        return found

    def __str__(self) -> str:
        context = self.context
        if not context:
            return self.message
        shown = ", ".join(
            f"{'file' if name == 'rel_path' else name}="
            f"{repr(bounded(value, LIMIT)) if isinstance(value, str) else bounded(value)}"
            for name, value in context.items()
        )
        return f"{self.message} [{shown}]"


class TransientError(GirderUploadStreamError):
    """A failure that may go away by itself: retry, and do not commit past it."""


class UnreachableError(TransientError):
    """A server gave no answer (connection refused or reset, a timeout): every other
    request to it would meet the same, so a batch of work stops at once."""


class AuthenticationError(TransientError):
    """A server refused the credentials (a key at log-in, an expired or revoked token).
    Transient on purpose: no input fails for good because of it; the work waits and the
    client logs in again. Every other request would meet it too."""


class TerminalError(GirderUploadStreamError):
    """A failure caused by the input itself: record it and move on."""


class FatalError(GirderUploadStreamError):
    """Neither the world for a while nor one input: the run cannot go on (e.g. the root
    folder given by id is gone). The run stops gracefully and its summary names it
    (``fatal_error``; the command exits with status 2)."""


class ChunkDecodeError(TerminalError):
    """A message value (or key) is not a valid OpenMSIStream file chunk.

    ``reason`` is a short human-readable explanation, e.g. ``"chunk hash mismatch"``.
    """

    #: True for a rejection whose registry row holds its offset (never summarised).
    keeps_its_row = False
    #: False when the message's bytes are no longer held (a chunk found lying after it
    #: was stored): its dead letter reads them again from Kafka.
    bytes_in_hand = True

    def __init__(self, reason: str, **context: Any) -> None:
        super().__init__(f"invalid chunk message: {reason}", **context)
        self.reason = bounded(reason, MESSAGE_LIMIT)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.reason,), self.__dict__)


class FileRejectedError(TerminalError):
    """A whole file was refused (mismatched hash, bad offsets, too large, unsafe path...)."""

    def __init__(self, reason: str, **context: Any) -> None:
        super().__init__(f"file rejected: {reason}", **context)
        self.reason = bounded(reason, MESSAGE_LIMIT)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.reason,), self.__dict__)


class SourceFileChangedError(TransientError):
    """A file changed while the producer was chunking it; chunk it again later."""


class StorageError(TransientError):
    """Local storage failed for a reason that is not the file's fault (disk full, I/O error)."""


class ConfigError(GirderUploadStreamError):
    """A configuration file or setting is missing, malformed or refers to unset variables.

    ``path``, ``section`` and ``option`` are recorded in ``details`` when given.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        section: str | None = None,
        option: str | None = None,
        **context: Any,
    ) -> None:
        details = dict(context.pop("details", None) or {})
        for name, value in (("path", path), ("section", section), ("option", option)):
            if value is not None:
                details[name] = str(value)
        super().__init__(message, details=details, **context)
