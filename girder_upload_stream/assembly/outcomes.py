"""What the :class:`~girder_upload_stream.assembly.reassembly.Reassembler` hands back: the
modes and what it did with a chunk (the files it completed or dropped, and the files in
progress, are :mod:`girder_upload_stream.shared_types`' ``CompletedFile``, ``RejectedFile``
and ``FileProgress``, which other layers use too). Plain values, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from girder_upload_stream.shared_types import CompletedFile, RejectedFile
from girder_upload_stream.wire.codec import FileKey

__all__ = ["Mode", "Storage", "AddStatus", "AddResult"]


class Mode(StrEnum):
    """Where files are rebuilt: in RAM, on disk under ``output_dir``, or both."""

    MEMORY = "memory"
    DISK = "disk"
    BOTH = "both"


class Storage(StrEnum):
    """Where the bytes of one file being rebuilt are: the mode's choice, until a memory
    budget moves (*spills*) them to a staging file (:meth:`Reassembler.spill`)."""

    RAM = "ram"                    # memory mode
    RAM_AND_DISK = "ram_and_disk"  # both mode: RAM, and the staging file
    DISK = "disk"                  # disk mode, or spilled: the staging file only


class AddStatus(StrEnum):
    """What :meth:`Reassembler.add` did with a chunk."""

    ACCEPTED = "accepted"    # stored; file still in progress
    DUPLICATE = "duplicate"  # same chunk seen before (or its file already completed)
    COMPLETED = "completed"  # this chunk completed a verified file
    REJECTED = "rejected"    # this chunk made its file invalid; the file was dropped
    IGNORED = "ignored"      # chunk of a file whose path was refused earlier
    REFUSED = "refused"      # this chunk alone cannot be used (impossible, over a bound);
    #                          the file, if any, goes on without it


@dataclass(frozen=True, slots=True)
class AddResult:
    """Outcome of adding one chunk; ``completed``/``rejected`` set for those statuses."""

    status: AddStatus
    file_key: FileKey
    reason: str = ""
    completed: CompletedFile | None = None
    rejected: RejectedFile | None = None
    #: The file now has competing copies (other bytes for a chunk number, another chunk
    #: count): its in-order prefix is no longer known to be its bytes (no streaming).
    contested: bool = False
    #: REFUSED because the bound of files in progress is reached (room may be made).
    full: bool = False
    #: DUPLICATE of a chunk held of a file none of whose copies verified: its message
    #: is dropped as a chunk of a rejected file (a dead letter), not as a free copy.
    of_rejected: bool = False

