"""What a file's transitions ask the world to do, as values.

A named transition of the :class:`~girder_upload_stream.ledger.records.FileLedger`
(hand a file over, reject it, settle it, give up its streamed upload, let a stale file
go...) changes only its record and returns the *effects* it calls for: staging to
release, a stream to abandon, an assembly to drop, offsets to release, a registry row to
write. One place carries them out, in order
(:meth:`~girder_upload_stream.ledger.processor.StreamProcessor._carry_out`), so a
file's state is no longer kept in sync by hand across the reassembler, the offset
tracker, the stream session and the registries. Plain frozen values: a test walks the
transitions and compares what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from girder_upload_stream.shared_types import CompletedFile
from girder_upload_stream.wire.codec import FileKey

__all__ = ["Effect", "AbandonStream", "DropAssembly", "FinishAssembly", "ReleaseStaging",
           "ReleaseOffsets", "WriteRow", "ROWS"]

#: The :class:`~girder_upload_stream.shared_types.Recorder` calls a row may be.
ROWS = frozenset({"file_rejected", "file_messages_rejected", "file_found", "file_stale",
                  "file_dropped"})


@dataclass(frozen=True, slots=True)
class AbandonStream:
    """Give up the streamed upload ``handle`` (its session removes what it made)."""

    handle: Any


@dataclass(frozen=True, slots=True)
class DropAssembly:
    """Forget what the reassembler holds of ``key`` (its chunks, if they come back,
    rebuild it)."""

    key: FileKey


@dataclass(frozen=True, slots=True)
class FinishAssembly:
    """The file is done elsewhere (found in Girder): the reassembler drops its chunks and
    takes its later ones for duplicates."""

    key: FileKey


@dataclass(frozen=True, slots=True)
class ReleaseStaging:
    """The fate of ``completed`` is settled: its staging file may go."""

    completed: CompletedFile


@dataclass(frozen=True, slots=True)
class ReleaseOffsets:
    """The file's pending messages are done (``retry``: read again by the next run,
    offsets rule 9)."""

    pending: Any  # the record's PendingOffsets
    retry: bool = False


@dataclass(frozen=True, slots=True)
class WriteRow:
    """Write down a file's fate: the recorder's ``call`` (one of :data:`ROWS`) with
    ``args``."""

    call: str
    args: tuple

    def __post_init__(self) -> None:
        if self.call not in ROWS:
            raise ValueError(f"no such row: {self.call}")


Effect = AbandonStream | DropAssembly | FinishAssembly | ReleaseStaging | ReleaseOffsets \
    | WriteRow
