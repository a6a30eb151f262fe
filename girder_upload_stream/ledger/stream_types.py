"""What the polling loop and the pure core exchange: messages as read from Kafka,
partitions as assigned, where each file's fate is written down (a :class:`Recorder`,
the registries), and the run's counters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from girder_upload_stream.wire.codec import Chunk
from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.assembly.reassembly import CompletedFile, FileProgress, RejectedFile
from girder_upload_stream.ledger.units import FileOutcome

__all__ = ["RawMessage", "PartitionInfo", "Recorder", "Counters", "ChunkRefusedError"]


class ChunkRefusedError(ChunkDecodeError):
    """A well-formed chunk the reassembler cannot use (impossible for its file, or over a
    bound of files in progress or of competing copies); recorded like an undecodable
    message, through the same path (:meth:`Recorder.message_rejected`)."""

    def __init__(self, reason: str, **context) -> None:
        super().__init__(f"chunk refused: {reason}", **context)
        self.message = self.reason  # the registry and the log say "chunk refused: ..."


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as read from Kafka (value may be None for tombstones)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """A partition just assigned: its committed offset and commit metadata (None when
    unknown or never committed) and the oldest offset still in the topic."""

    topic: str
    partition: int
    committed: int | None
    metadata: str | None
    low: int | None


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


@dataclass
class Counters:
    """Totals since start, and since the last heartbeat (``take_delta``)."""

    messages_read: int = 0
    bytes_read: int = 0
    messages_processed: int = 0
    bytes_processed: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_found_in_girder: int = 0
    messages_rejected: int = 0
    messages_skipped: int = 0  # read, but done before a restart (offsets rule 8)
    #: Chunks put off at --max_files_in_progress (offsets rule 10), each counted once.
    messages_put_off: int = 0
    files_to_retry: int = 0  # upload failed for good: the next run tries again (rule 9)
    #: Skipped, a different file of that name being in Girder (no --replace_existing).
    files_skipped_different: int = 0
    #: Files (counted at their first chunk) --download_regex does not match: not uploaded.
    files_skipped_by_regex: int = 0
    _last: dict[str, int] = field(default_factory=dict, repr=False)

    def take_delta(self) -> dict[str, int]:
        now = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        return delta
