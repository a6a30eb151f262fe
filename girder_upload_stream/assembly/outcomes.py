"""What the :class:`~girder_upload_stream.assembly.reassembly.Reassembler` hands back: the
modes, what it did with a chunk, and the files it completed or dropped. Plain values, no
behaviour beyond formatting."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.errors import FileRejectedError
from girder_upload_stream.wire.codec import FileKey

__all__ = ["Mode", "Storage", "AddStatus", "CompletedFile", "RejectedFile", "AddResult",
           "FileProgress"]


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
class CompletedFile:
    """A rebuilt file whose sha512 matched. ``data`` in memory/both, ``path`` in disk/both:
    in disk mode the verified staging file (valid until :meth:`Reassembler.release`), in
    both mode the local copy at ``output_dir/<rel_path>``."""

    rel_path: str
    file_hash: bytes
    sha256: str
    size: int
    n_chunks: int
    first_message_at: float
    last_message_at: float
    file_mtime: float
    data: Pieces | None
    path: Path | None
    #: Bytes before this offset were let go once Girder acknowledged them (a streamed
    #: upload, :meth:`Reassembler.let_go`): only that upload can finish the file; ``data``
    #: and ``path`` hold the bytes from here on (0: the whole file).
    held_from: int = 0

    @property
    def file_hash_hex(self) -> str:
        """The sha512 of the file as hex."""
        return self.file_hash.hex()

    @property
    def file_key(self) -> FileKey:
        """``(rel_path, file_hash)``: the identity of this file generation."""
        return (self.rel_path, self.file_hash)


@dataclass(frozen=True, slots=True)
class RejectedFile:
    """A file generation that was dropped, and why."""

    rel_path: str
    file_hash: bytes
    reason: str
    n_chunks_received: int
    n_total_chunks: int
    first_message_at: float
    last_message_at: float
    #: Whole-file sha512 failed: the bytes held did not verify, so the messages are read
    #: again by the next run (another order may bring the copy that verifies); False for
    #: a file that can never be rebuilt (its path, its size).
    retry: bool = False

    def to_error(self) -> FileRejectedError:
        """The same facts as a :class:`FileRejectedError`, for logging or raising."""
        return FileRejectedError(self.reason, rel_path=self.rel_path,
                                 details={"file_hash": self.file_hash.hex()[:16]})


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


@dataclass(frozen=True, slots=True)
class FileProgress:
    """Status of one file generation still being assembled."""

    rel_path: str
    file_hash_hex: str
    n_received: int
    n_total: int
    bytes_received: int
    bytes_held: int
    first_message_at: float
    last_message_at: float
