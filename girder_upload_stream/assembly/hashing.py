"""Whole-file sha512 and sha256 computed on a helper thread, in the order bytes arrive.

Why: the polling thread already pays for msgpack decoding, the chunk's own sha512 check
and the disk write. Hashing every byte twice more on that thread made it the bottleneck
of large files (decode + add ran at about half the speed of one sha512). hashlib releases
the GIL for buffers over 2 KiB, so a second thread hashing the file runs on the other core.

One :class:`HashPipe` serves one :class:`~girder_upload_stream.assembly.reassembly.Reassembler`.
Its single worker takes blocks first in, first out, so each file's blocks are hashed in
the order they were given. At most ``max_pending_bytes`` wait at any time; a caller
giving more waits (back-pressure: in disk mode the queued blocks are RAM that would
otherwise already be free). Small blocks of a file with nothing queued are hashed at
once: handing 64 KiB to a thread costs more than hashing it. The worker exits after
``idle_seconds`` without work and is started again by the next block, so an idle or
forgotten pipe holds no thread.

Blocks must not change after they are given (``bytes``, or views of immutable bytes).
A *job* may stand for a block the caller does not hold (a stretch of a file on disk):
the worker runs it, and it feeds the bytes it reads to the function it is given.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["HashPipe", "FileDigest", "HashJob", "INLINE_BYTES"]

#: A job run on the worker: it passes every block of its stretch, in order, to its argument.
HashJob = Callable[[Callable[[memoryview], None]], None]

#: Blocks up to this size are hashed by the caller when its file has nothing queued.
INLINE_BYTES = 128 * 1024


_DISCARDED = RuntimeError("digest discarded")


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class FileDigest:
    """The sha512 and sha256 of one file, fed block by block through a :class:`HashPipe`."""

    __slots__ = ("_pipe", "_sha512", "_sha256", "_queued", "_error", "hashed_bytes")

    def __init__(self, pipe: HashPipe) -> None:
        self._pipe = pipe
        self._sha512 = hashlib.sha512()
        self._sha256 = hashlib.sha256()
        self._queued = 0  # blocks given to the worker and not hashed yet
        self._error: BaseException | None = None
        self.hashed_bytes = 0  # bytes given so far (hashed, or queued to be)

    def update(self, data: bytes | memoryview, *, now: bool = False) -> None:
        """Add the next block of the file.

        ``now=True`` hashes it before returning (after any queued blocks): for a buffer
        the caller reuses, or when the digest is needed at once. After a job failed, blocks
        are only counted (the error waits for :meth:`wait`).
        """
        size = _nbytes(data)
        self.hashed_bytes += size
        if now or (size <= INLINE_BYTES and self._queued == 0):
            self._pipe.wait_for(self)
            if self._error is None:
                self._hash(data)
        else:
            self._pipe.submit(self, data, size)

    def update_later(self, job: HashJob, size: int) -> None:
        """Add the next ``size`` bytes of the file through ``job``, run on the worker.

        The job's errors (e.g. ``OSError`` reading the disk) are raised by :meth:`wait`.
        """
        self.hashed_bytes += size
        self._pipe.submit(self, job, 0)  # holds no bytes while queued

    def _hash(self, data: bytes | memoryview) -> None:
        self._sha512.update(data)
        self._sha256.update(data)

    def wait(self) -> None:
        """Return once every block given so far has been hashed; raise a job's error."""
        self._pipe.wait_for(self)
        if self._error is not None:
            raise self._error

    def discard(self) -> None:
        """Give up on this file: its queued blocks are skipped, not hashed."""
        self._error = _DISCARDED

    def sha512(self) -> bytes:
        """The sha512 digest of all blocks given so far (waits for queued ones)."""
        self.wait()
        return self._sha512.digest()

    def sha256_hex(self) -> str:
        """The sha256 of all blocks given so far, as hex (waits for queued ones)."""
        self.wait()
        return self._sha256.hexdigest()


class HashPipe:
    """One worker thread hashing :class:`FileDigest` blocks first in, first out."""

    # 4 MiB: a 2 GiB file in disk mode peaked at 401-426 MiB RSS with it against 450-591
    # MiB with 32 MiB, at the same MB/s; the bursts of the in-order prefix then wait at
    # submit instead of at completion, which costs the same.
    def __init__(self, max_pending_bytes: int = 4 * 1024 * 1024,
                 idle_seconds: float = 5.0) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.idle_seconds = idle_seconds
        self._queue: deque[tuple[FileDigest, bytes | memoryview | HashJob, int]] = deque()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def digest(self) -> FileDigest:
        """A new, empty digest for one file."""
        return FileDigest(self)

    @property
    def pending_bytes(self) -> int:
        """Bytes given and not hashed yet (bounded by ``max_pending_bytes``)."""
        return self._pending_bytes

    def submit(self, digest: FileDigest, data: bytes | memoryview | HashJob,
               size: int | None = None) -> None:
        """Queue one block (or job holding ``size`` bytes of RAM); wait first while the
        queue holds ``max_pending_bytes``."""
        size = _nbytes(data) if size is None else size
        with self._cond:
            # A block larger than the bound is still accepted once the queue is empty.
            while self._pending_bytes and self._pending_bytes + size > self.max_pending_bytes:
                self._cond.wait()
            self._queue.append((digest, data, size))
            self._pending_bytes += size
            digest._queued += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="gus-file-hash",
                                                daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def wait_for(self, digest: FileDigest) -> None:
        """Block until ``digest`` has no queued blocks."""
        if digest._queued == 0:  # fast path: only this caller's own submit raises it
            return
        with self._cond:
            while digest._queued:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if not self._cond.wait(self.idle_seconds) and not self._queue:
                        self._worker = None  # submit starts a new worker for new work
                        return
                digest, data, size = self._queue[0]
            try:
                if digest._error is None:
                    if callable(data):
                        data(digest._hash)
                    else:
                        digest._hash(data)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                digest._error = exc
            with self._cond:
                self._queue.popleft()
                self._pending_bytes -= size
                digest._queued -= 1
                self._cond.notify_all()
