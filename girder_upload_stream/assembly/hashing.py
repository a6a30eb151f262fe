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

__all__ = ["HashPipe", "FileDigest", "HashJob", "INLINE_BYTES", "MARK_SPACING"]

#: A job run on the worker: it passes every block of its stretch, in order, to its argument.
HashJob = Callable[[Callable[[memoryview], None]], None]

#: Blocks up to this size are hashed by the caller when its file has nothing queued.
INLINE_BYTES = 128 * 1024
#: Rewind points are kept at least this many bytes apart (two hash states each, about
#: 600 bytes: 0.2% of the bytes between them at most).
MARK_SPACING = 256 * 1024


_DISCARDED = RuntimeError("digest discarded")


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class FileDigest:
    """The sha512 and sha256 of one file, fed block by block through a :class:`HashPipe`."""

    __slots__ = ("_pipe", "_sha512", "_sha256", "_queued", "_error", "hashed_bytes",
                 "_done", "_wanted", "_marks", "_last_mark")

    def __init__(self, pipe: HashPipe) -> None:
        self._pipe = pipe
        self._sha512 = hashlib.sha512()
        self._sha256 = hashlib.sha256()
        self._queued = 0  # blocks given to the worker and not hashed yet
        self._error: BaseException | None = None
        self.hashed_bytes = 0  # bytes given so far (hashed, or queued to be)
        self._done = 0  # bytes hashed so far
        # Rewind points (see rewind): positions asked for, in order, and the hash
        # states taken there once the bytes before them were hashed.
        self._wanted: deque[int] = deque()
        self._marks: dict[int, tuple] = {}
        self._last_mark = 0

    def update(self, data: bytes | memoryview, *, now: bool = False,
               mark: bool = False) -> None:
        """Add the next block of the file.

        ``now=True`` hashes it before returning (after any queued blocks): for a buffer
        the caller reuses, or when the digest is needed at once. ``mark=True`` keeps the
        hash state after the block as a point :meth:`rewind` can return to (unless the
        last one is less than the pipe's ``mark_spacing`` bytes before it). After a job
        failed, blocks are only counted (the error waits for :meth:`wait`).
        """
        size = _nbytes(data)
        self.hashed_bytes += size
        if mark and self.hashed_bytes - self._last_mark >= self._pipe.mark_spacing:
            self._wanted.append(self.hashed_bytes)
            self._last_mark = self.hashed_bytes
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
        self._done += _nbytes(data)
        wanted = self._wanted
        while wanted and wanted[0] <= self._done:
            if wanted.popleft() == self._done:
                self._marks[self._done] = (self._sha512.copy(), self._sha256.copy())

    @property
    def mark_positions(self) -> list[int]:
        """The rewind points asked for so far (taken, or to be once hashed), in order."""
        return sorted([*self._marks, *self._wanted])

    def forget_marks_below(self, position: int) -> None:
        """Rewinding below ``position`` will not be asked for: drop those points."""
        for at in [at for at in self._marks if at < position]:
            del self._marks[at]

    def rewind(self, limit: int, floor: int) -> int | None:
        """Go back to the latest rewind point within ``[floor, limit]`` (the start of the
        file counts as one when ``floor`` is 0), forgetting every byte after it, so that
        other bytes can follow it. Returns the position gone back to, or None when there
        is no such point (the digest is then unchanged). Waits for queued blocks first.

        Why: a chunk found lying about its own hash (lazy chunk checks, see
        :mod:`.lazy_checks`) may have been hashed already; the bytes before it, which a
        streamed upload may have let go of, need not be hashed again."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - a failed job's bytes lie past any point
            if self._error is _DISCARDED:
                return None
        points = [at for at in self._marks if floor <= at <= limit]
        if points:
            at = max(points)
            sha512, sha256 = self._marks[at]
            self._sha512, self._sha256 = sha512.copy(), sha256.copy()
        elif floor == 0:
            at = 0
            self._sha512, self._sha256 = hashlib.sha512(), hashlib.sha256()
        else:
            return None
        for later in [p for p in self._marks if p > at]:
            del self._marks[later]
        self._wanted.clear()
        self._error = None
        self._done = self.hashed_bytes = self._last_mark = at
        return at

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
                 idle_seconds: float = 5.0, mark_spacing: int = MARK_SPACING) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.mark_spacing = mark_spacing  # between the rewind points of a digest
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
