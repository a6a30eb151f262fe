"""Plain data types that cross layers: a message as read from Kafka, a partition as
assigned, a file rebuilt, dropped or in progress, an upload's outcome, what a streamed
upload reads, and the :class:`Recorder` that file fates are written into.

They live here, in a leaf module, rather than in the modules that make or use them, so
that each layer imports only what it uses and imports point one way (docs/
architecture.md, "Layers"): ``kafka/`` hands out :class:`RawMessage` and
:class:`PartitionInfo` without loading the consumer core, ``girder/`` returns
:class:`FileOutcome` values without loading the ledger, and the registries implement
:class:`Recorder` without importing the processor. At run time this module imports
only :mod:`girder_upload_stream.errors`; the types it names in annotations only are
imported for type checkers alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from girder_upload_stream.errors import ChunkDecodeError, FileRejectedError

if TYPE_CHECKING:  # annotations only: these modules sit above this leaf
    from girder_upload_stream.assembly.pieces import Pieces
    from girder_upload_stream.wire.codec import Chunk, FileKey

__all__ = ["RawMessage", "PartitionInfo", "CompletedFile", "RejectedFile", "FileProgress",
           "file_generation", "Outcome", "FileOutcome", "StreamPlan", "RETRIED_NEXT_RUN",
           "Recorder"]

#: What the registry says of a file whose upload failed for good, or none of whose
#: copies verified (offsets rule 9).
RETRIED_NEXT_RUN = "its messages are read again by the next run of this consumer group"


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as read from Kafka (value may be None for tombstones).

    ``origin``: where a message re-keyed by file (``--rekey_by_file``) was first read,
    ``(topic, partition, offset)`` of the source topic (its ``key`` is then the
    original key); None for a message read where it was produced. ``topic``,
    ``partition`` and ``offset`` are always where this consumer read it (its commits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    origin: tuple[str, int, int] | None = None

    @property
    def source(self) -> tuple[str, int, int]:
        """Where the message was produced: what logs, registries and dead letters name."""
        return self.origin or (self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """A partition just assigned: its committed offset and commit metadata (None when
    unknown or never committed), the oldest offset still in the topic and the next
    offset to be written (``high``: the end of the log when it was assigned)."""

    topic: str
    partition: int
    committed: int | None
    metadata: str | None
    low: int | None
    high: int | None = None


def file_generation(file_hash: bytes) -> str:
    """The short id of one generation of a file (its sha512 prefix), as registries keep it."""
    return file_hash.hex()[:32]


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


class Outcome(StrEnum):
    UPLOADED = "uploaded"                    # a new item was created
    REPLACED = "replaced"                    # --replace_existing swapped different content
    SKIPPED_IDENTICAL = "skipped_identical"  # the same content is already there
    SKIPPED_DIFFERENT = "skipped_different"  # different content there; not replaced
    FAILED_TERMINAL = "failed_terminal"      # cannot succeed (bad name, permissions)
    FAILED_TRANSIENT = "failed_transient"    # may succeed later (server down, 5xx)

    @property
    def durable(self) -> bool:
        """True when the file's messages may be committed (it is in Girder or never will be)."""
        return self is not Outcome.FAILED_TRANSIENT


@dataclass(frozen=True)
class FileOutcome:
    rel_path: str
    file_key: FileKey
    outcome: Outcome
    reason: str = ""
    item_id: str | None = None


@dataclass(frozen=True)
class StreamPlan:
    """What a streamed upload needs: the file, its size, two views of the bytes the
    reassembler holds and a way to let go of the bytes sent (called from the upload's
    own thread; all thread-safe)."""

    rel_path: str
    file_hash: bytes
    size: int
    #: ``() -> (size, prefix_end, last_chunk_offset) | None`` (None: no longer assembling)
    view: Callable[[], tuple[int | None, int, int] | None]
    #: ``(start, end) -> bytes | None``: bytes of the in-order prefix
    read: Callable[[int, int], bytes | None]
    #: whether another consumer of the group may upload the same file now
    shared: Callable[[], bool]
    #: ``(end) -> None``: Girder acknowledged bytes ``[0, end)``; the reassembler may let
    #: go of them (then only this upload can finish the file)
    let_go: Callable[[int], object] = lambda end: None


class Recorder:
    """Where file fates are written down (the registries); this base records nothing.

    It is also the one rejection sink: every message the consumer rejects is reported
    here (``message_rejected``: not a valid chunk; ``file_messages_rejected``: the
    messages, by offset, of a file that failed (``file_rejected``: its row); ``chunk_rejected``: a chunk of a file rejected
    before, or beyond a bound), and goes on to the dead-letter topic if one is set."""

    def chunk_added(self, chunk: Chunk, partition: int, offset: int) -> None: ...
    def message_rejected(self, msg: RawMessage, error: ChunkDecodeError) -> None: ...
    def file_rejected(self, rejected: RejectedFile) -> None: ...
    def file_messages_rejected(self, rejected: RejectedFile,
                               where: Sequence[tuple[tuple[str, int], int]]) -> None: ...
    def chunk_rejected(self, msg: RawMessage, reason: str, kind: str = "chunk_rejected",
                       file: str | None = None) -> None: ...
    def file_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None: ...
    def file_found(self, progress: FileProgress) -> None: ...
    def file_stale(self, progress: FileProgress, reason: str) -> None: ...
    def file_dropped(self, progress: FileProgress) -> None: ...
    def messages_gone(self, partition: int, first: int, end: int) -> None: ...
