"""Which files stream into Girder while they arrive, and what their upload may read.

Pure: the processor decides, the I/O side (:mod:`girder_upload_stream.girder.streaming`)
opens the upload and sends the bytes. A file streams when it is big (its chunk count
times its chunk size reaches ``min_bytes``), its messages hold their commit (a file
produced again is skipped by Girder anyway) and its size is known: Girder's upload
needs the exact size up front, and the OpenMSIStream wire format carries none, so the
upload opens once the file's last chunk is in. Never on one message's word: bytes
from offset 0 must be in hand too, and agree with it (the last chunk starts at or after
the end of that prefix); the session then waits for a whole block of that prefix
before it makes anything in Girder. Smaller files keep the batched upload
units (a streamed file costs one more Girder request and its own task run). What a
streamed upload reads is a :class:`~girder_upload_stream.shared_types.StreamPlan`, which
``girder/`` takes without importing the ledger.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["DEFAULT_STREAM_MIN_BYTES", "MAX_OPEN_STREAMS", "StreamHandle", "wants_stream"]

#: Files from this size stream: 4 upload units' worth (16 MiB each). Below it, an
#: upload at completion takes a fraction of a second and overlapping gains little.
DEFAULT_STREAM_MIN_BYTES = 64 << 20
#: At most this many files stream at once (each is a thread, a Girder item and an open
#: upload): a flood of last chunks of files that never complete must not open one each.
#: The others are uploaded at completion, or stream once a place is free.
MAX_OPEN_STREAMS = 8


class StreamHandle(Protocol):
    """The I/O side's session of one streamed file."""

    def nudge(self) -> None: ...
    def drains_to(self) -> int: ...
    def abandon(self) -> None: ...
    def close(self, timeout: float) -> None: ...


def wants_stream(n_total: int, chunk_size: int, size: int | None, min_bytes: int | None,
                 holds_commit: bool, prefix_end: int = 0, last_offset: int = -1) -> bool:
    """Whether a file being assembled should open a streamed upload now: big, and its
    size (``last_offset`` plus the last chunk's size) agrees with the in-order prefix
    held (``prefix_end`` bytes from offset 0, at least one chunk)."""
    if min_bytes is None or size is None or not holds_commit:
        return False
    if not 0 < prefix_end <= last_offset < size:
        return False
    return max(size, n_total * chunk_size) >= min_bytes
