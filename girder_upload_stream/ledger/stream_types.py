"""What the polling loop and the pure core exchange besides the shared data types
(messages, partitions, the :class:`~girder_upload_stream.shared_types.Recorder`: in
:mod:`girder_upload_stream.shared_types`): the run's counters, and the error of a chunk
the reassembler refuses."""

from __future__ import annotations

from dataclasses import dataclass, field

from girder_upload_stream.errors import ChunkDecodeError

__all__ = ["Counters", "ChunkRefusedError"]


class ChunkRefusedError(ChunkDecodeError):
    """A well-formed chunk the reassembler cannot use (impossible for its file, or over a
    bound of files in progress or of competing copies); recorded like an undecodable
    message, through the same path (:meth:`Recorder.message_rejected`)."""

    def __init__(self, reason: str, **context) -> None:
        super().__init__(f"chunk refused: {reason}", **context)
        self.message = self.reason  # the registry and the log say "chunk refused: ..."


class ChunkLiedError(ChunkDecodeError):
    """A chunk stored without its own sha512 checked (lazy checks) and found lying
    since: recorded like one refused on arrival, its bytes read again for its dead
    letter."""

    bytes_in_hand = False


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
