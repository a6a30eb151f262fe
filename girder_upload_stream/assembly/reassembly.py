"""Rebuild whole files from OpenMSIStream chunks that arrive in any order.

A file generation is identified by ``(rel_path, file_hash)``, so two generations of the
same path assemble side by side. Chunks may arrive in any order, interleaved with other
files, and more than once. Each chunk is placed by its index and offset; every placement
is checked against the nearest chunks already present, so overlaps, holes and chunks past
the end are refused as soon as they can be proven, not only at the end. A chunk that
cannot belong to a file under the size limit, or whose path reaches a folder the
consumer keeps its own files in, rejects its file at once (:mod:`._chunk_rules`). Every
chunk costs O(log k) for the k chunks of its file present, whatever ``n_total_chunks``
it claims.

Modes: ``memory`` keeps chunk data in RAM (never joined: see :mod:`.pieces`); ``disk`` writes
each chunk at its offset into a *staging file* of this run's folder
``output_dir/.gus-staging/run-<random>/`` (RAM stays small whatever the file size),
named from a hash of the generation, never from message text; the completed file is
uploaded from there (``CompletedFile.path``), the very bytes whose sha512 was checked,
and deleted by :meth:`Reassembler.release` once its fate is settled, as OpenMSIStream
1.8.8 deletes a file rebuilt on disk once it has been processed. ``both`` does both and
keeps a local copy: the verified staging file is renamed to ``output_dir/<rel_path>``,
and the upload reads the bytes from memory. The sha512 (checked against ``file_hash``)
and the sha256 (for Girder) are computed incrementally over the in-order prefix as
chunks arrive, on a helper thread (:mod:`.hashing`) so that they do not hold up the
thread adding chunks.

Disk writes never leave ``output_dir``: paths are re-validated here, every directory is
opened relative to its parent with ``O_NOFOLLOW`` (a symlink anywhere below
``output_dir`` refuses the file in both mode), and files are opened with ``O_NOFOLLOW``.
An error of the operating system that is the file's fault (a name or offset the file
system refuses: ``ENAMETOOLONG``, ``EFBIG``, ``OverflowError``, ``ValueError``...)
rejects the file; only a failing storage (``ENOSPC``, ``EIO``...) is a transient
:class:`~girder_upload_stream.errors.StorageError`.

A :class:`Reassembler` is thread-safe (one internal lock) but not process-safe.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from girder_upload_stream.assembly.chunk_rules import (placement_problem, reserved_paths, reserved_problem, size_problem,
                           staging_name)
from girder_upload_stream.assembly.safe_disk import PATH_ERRNOS, STAGING_DIR, SafeDir, StagingArea
from girder_upload_stream.wire.codec import DEFAULT_MAX_FILE_BYTES, MAX_POSSIBLE_FILE_BYTES, Chunk, FileKey, path_problem
from girder_upload_stream.errors import FileRejectedError, StorageError
from girder_upload_stream.assembly.hashing import FileDigest, HashPipe
from girder_upload_stream.assembly.pieces import Pieces

logger = logging.getLogger(__name__)

__all__ = [
    "Mode",
    "AddStatus",
    "AddResult",
    "CompletedFile",
    "RejectedFile",
    "FileProgress",
    "Storage",
    "Reassembler",
    "STAGING_DIR",
    "reserved_paths",
]


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
    IGNORED = "ignored"      # chunk of a file rejected earlier


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


class _Rejection(Exception):
    """Internal: the file must be dropped for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _State:
    """Everything known about one file generation in progress."""

    __slots__ = ("rel_path", "file_hash", "n_total", "file_mtime", "pieces", "order",
                 "data", "total", "bytes_received", "bytes_held", "digest",
                 "next_hash_i", "first_at", "last_at", "partial", "storage")

    def __init__(self, chunk: Chunk, now: float, partial: str | None,
                 digest: FileDigest, storage: Storage) -> None:
        self.rel_path = chunk.rel_path
        self.file_hash = chunk.file_hash
        self.n_total = chunk.n_total_chunks
        self.file_mtime = chunk.file_mtime
        self.pieces: dict[int, tuple[int, int, bytes]] = {}  # i -> (offset, size, hash)
        self.order: list[int] = []  # sorted chunk indices present
        self.data: dict[int, bytes | memoryview] = {}
        self.total: int | None = None
        self.bytes_received = 0
        self.bytes_held = 0
        self.digest = digest
        self.next_hash_i = 1
        self.first_at = now
        self.last_at = now
        self.partial = partial  # the staging file's name, in disk/both modes or spilled
        self.storage = storage

    def hash_block(self, block: memoryview) -> None:
        """Hash bytes read back from disk (into a reused buffer) before returning."""
        self.digest.update(block, now=True)

    def hash_piece(self, data: bytes | memoryview, now: bool) -> None:
        """Hash the next chunk of the in-order prefix (``now``: its digest is due)."""
        self.digest.update(data, now=now)
        self.next_hash_i += 1


def _split(rel_path: str) -> tuple[str, str]:
    subdir, _, name = rel_path.rpartition("/")
    return subdir, name


class Reassembler:
    """Collect chunks of many files and hand back each file once it is complete and verified.

    ``max_file_bytes`` bounds one file (None: only what a file offset can hold, 2**63-1
    bytes). ``reserved`` lists POSIX paths relative to ``output_dir`` that no file may
    reach (see :func:`reserved_paths`); the staging folder is always one, in every mode,
    so that a name is refused or accepted alike whatever the mode. ``clock`` gives
    message times (epoch seconds). At most ``max_finished`` finished file keys are
    remembered so that late duplicates of finished files are recognised (oldest
    forgotten first).

    In disk and both modes, creating a Reassembler deletes the staging files that runs
    which ended left behind (see :class:`~._safe_disk.StagingArea`; ``stale_removed``
    counts their folders), and :meth:`close` (or the end of the process) deletes its
    own: their messages were not committed unless the file is in Girder, so they are
    read again and their files rebuilt.
    """

    def __init__(self, mode: Mode | str = Mode.MEMORY, output_dir: Path | str | None = None,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES, *,
                 reserved: Iterable[str] = (), clock: Callable[[], float] = time.time,
                 max_finished: int = 10_000, hash_pipe: HashPipe | None = None) -> None:
        self.mode = Mode(mode)
        if self.mode is not Mode.MEMORY and output_dir is None:
            raise ValueError(f"mode {self.mode.value!r} needs an output_dir")
        limit = MAX_POSSIBLE_FILE_BYTES if max_file_bytes is None else max_file_bytes
        if not 1 <= limit <= MAX_POSSIBLE_FILE_BYTES:
            raise ValueError(f"max_file_bytes must be within 1..2**63-1, not {limit}")
        self.max_file_bytes = limit
        self._disk = SafeDir(Path(output_dir)) if self.mode is not Mode.MEMORY else None
        self.output_dir = self._disk.root if self._disk else None
        self._staging = StagingArea(self._disk) if self._disk else None
        # Memory mode spills to a staging folder made when first needed (None: cannot).
        self._spill_root = Path(output_dir) if output_dir is not None else None
        self.spilled_files = 0
        self.spilled_bytes = 0
        self.stale_removed = self._staging.stale_removed if self._staging else 0
        self._reserved = tuple(sorted({tuple(r.split("/")) for r in reserved}
                                      | {(STAGING_DIR,)}))
        self._clock = clock
        self._files: dict[FileKey, _State] = {}
        self._finished: OrderedDict[FileKey, str] = OrderedDict()
        self._max_finished = max_finished
        self._serial = 0
        self._bytes_held = 0
        self._hashes = hash_pipe or HashPipe()
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        """Chunk bytes currently held in RAM across all files (for back-pressure)."""
        return self._bytes_held

    @property
    def staging_dir(self) -> Path | None:
        """This run's staging folder (disk and both modes), else None."""
        return self._staging.path if self._staging else None

    def add(self, chunk: Chunk) -> AddResult:
        """Add one decoded chunk and say what happened (see :class:`AddStatus`).

        Raises :class:`StorageError` (transient) if the disk fails for a reason that is
        not the file's fault; the chunk is then not recorded and may be added again.
        Raises nothing else: whatever its fields, a chunk is at worst its file's rejection.
        """
        with self._lock:
            now = self._clock()
            key = chunk.file_key
            finished = self._finished.get(key)
            if finished is not None:
                status = AddStatus.DUPLICATE if finished == "" else AddStatus.IGNORED
                reason = "file already completed" if finished == "" else \
                    f"file already rejected: {finished}"
                return AddResult(status, key, reason)
            state = self._files.get(key)
            try:
                problem = size_problem(chunk, self.max_file_bytes)
                if problem:
                    raise _Rejection(problem)
                if state is None:
                    state = self._new_state(chunk, now)
                return self._add_to(state, chunk, key, now)
            except _Rejection as rejection:
                return self._reject(key, state, chunk, now, rejection.reason)

    def _new_state(self, chunk: Chunk, now: float) -> _State:
        problem = path_problem(chunk.filename, chunk.subdir, chunk.filename_append)
        if problem:
            raise _Rejection(f"unsafe path: {problem}")
        problem = reserved_problem(chunk.rel_path, self._reserved)
        if problem:
            raise _Rejection(problem)
        partial = None
        if self.mode is not Mode.MEMORY:
            partial = self._new_partial(chunk.rel_path, chunk.file_hash)
        storage = {Mode.MEMORY: Storage.RAM, Mode.DISK: Storage.DISK,
                   Mode.BOTH: Storage.RAM_AND_DISK}[self.mode]
        return _State(chunk, now, partial, self._hashes.digest(), storage)

    def _new_partial(self, rel_path: str, file_hash: bytes) -> str:
        self._serial += 1
        return staging_name(rel_path, file_hash, self._serial)

    def _add_to(self, state: _State, chunk: Chunk, key: FileKey, now: float) -> AddResult:
        i, offset, size = chunk.chunk_i, chunk.chunk_offset, chunk.size
        if chunk.n_total_chunks != state.n_total:
            raise _Rejection(f"n_total_chunks changed from {state.n_total} to "
                             f"{chunk.n_total_chunks} within one generation")
        known = state.pieces.get(i)
        if known is not None:
            if known == (offset, size, chunk.chunk_hash):
                state.last_at = now
                if len(state.pieces) == state.n_total:  # completion failed before: retry
                    return self._complete(state, key, now)
                return AddResult(AddStatus.DUPLICATE, key, f"chunk {i} already received")
            raise _Rejection(f"chunk {i} received twice with different offset or data")
        problem = placement_problem(state, i, offset, size)
        if problem:
            raise _Rejection(problem)
        self._store(state, chunk, key)
        state.last_at = now
        if len(state.pieces) < state.n_total:
            return AddResult(AddStatus.ACCEPTED, key)
        return self._complete(state, key, now)

    def _store(self, state: _State, chunk: Chunk, key: FileKey) -> None:
        i = chunk.chunk_i
        if state.partial is not None:
            try:
                self._staging.write(state.partial, chunk.chunk_offset, chunk.data,
                                    truncate=not state.pieces)
            except (OSError, OverflowError, ValueError) as exc:
                self._raise_os_error(exc, state.rel_path)
        if not state.pieces:
            self._files[key] = state
        state.pieces[i] = (chunk.chunk_offset, chunk.size, chunk.chunk_hash)
        bisect.insort(state.order, i)
        state.bytes_received += chunk.size
        if i == state.n_total:
            state.total = chunk.chunk_offset + chunk.size
        due = len(state.pieces) == state.n_total  # the file completes: hash it now
        if state.storage is Storage.DISK:
            if i == state.next_hash_i:
                state.hash_piece(chunk.data, due)
                self._hash_from_disk(state)
            return
        state.data[i] = chunk.data
        state.bytes_held += chunk.size
        self._bytes_held += chunk.size
        while state.next_hash_i in state.data:
            state.hash_piece(state.data[state.next_hash_i], due)

    def _hash_from_disk(self, state: _State) -> None:
        """Queue the read-back of the chunks already on disk that now extend the in-order
        prefix (they arrived early), so that completion rarely has a whole file to read."""
        first = last = state.next_hash_i
        if first not in state.pieces:
            return
        while last + 1 in state.pieces:
            last += 1
        start = state.pieces[first][0]
        end = state.pieces[last][0] + state.pieces[last][1]
        staging, name = self._staging, state.partial

        def read_back(feed: Callable[[memoryview], None]) -> None:
            staging.hash_range(name, start, end, feed)

        state.digest.update_later(read_back, end - start)
        state.next_hash_i = last + 1

    @staticmethod
    def _raise_os_error(exc: BaseException, rel_path: str) -> None:
        """A file system error as the file's rejection (a name or an offset the file
        system refuses) or as a transient :class:`StorageError` (the storage fails)."""
        if isinstance(exc, (OverflowError, ValueError)):
            raise _Rejection(f"cannot write below output_dir: {exc}") from exc
        if isinstance(exc, OSError) and exc.errno in PATH_ERRNOS:
            raise _Rejection(f"cannot write below output_dir: {exc.strerror}") from exc
        raise StorageError(f"local storage failed: {exc}", rel_path=rel_path) from exc

    def _complete(self, state: _State, key: FileKey, now: float) -> AddResult:
        total = state.total
        data: Pieces | None = None
        if state.storage is not Storage.DISK:
            data = Pieces([state.data[i] for i in range(1, state.n_total + 1)])
        else:
            self._finish_disk_hash(state)
        if state.digest.sha512() != state.file_hash:
            raise _Rejection("mismatched hash: sha512 of the rebuilt file differs from "
                             "file_hash")
        path = None
        if self.mode is not Mode.BOTH and state.storage is Storage.DISK:
            path = self._staging.path_of(state.partial)
        elif state.partial is not None:
            subdir, final_name = _split(state.rel_path)
            try:
                self._disk.publish(self._staging.fd, state.partial, subdir, final_name)
            except (OSError, ValueError) as exc:
                self._raise_os_error(exc, state.rel_path)
            path = self._disk.root.joinpath(*state.rel_path.split("/"))
        completed = CompletedFile(state.rel_path, state.file_hash, state.digest.sha256_hex(),
                                  total, state.n_total, state.first_at, now,
                                  state.file_mtime, data, path)
        self._release(key, state)
        self._remember(key, "")
        return AddResult(AddStatus.COMPLETED, key, completed=completed)

    def _finish_disk_hash(self, state: _State) -> None:
        """Wait for the read-backs queued on the hash thread; if one failed, hash the
        whole staging file again here."""
        try:
            state.digest.wait()
        except Exception:  # noqa: BLE001 - whatever failed there is redone here
            state.digest = self._hashes.digest()
        if state.digest.hashed_bytes < state.total:
            try:
                self._staging.hash_range(state.partial, state.digest.hashed_bytes,
                                         state.total, state.hash_block)
            except (OSError, OverflowError, ValueError) as exc:
                self._raise_os_error(exc, state.rel_path)

    def _reject(self, key: FileKey, state: _State | None, chunk: Chunk, now: float,
                reason: str) -> AddResult:
        rejected = RejectedFile(
            chunk.rel_path, chunk.file_hash, reason,
            len(state.pieces) if state else 0, state.n_total if state else
            chunk.n_total_chunks, state.first_at if state else now, now)
        if state is not None:
            self._drop(key, state)
        self._remember(key, reason)
        return AddResult(AddStatus.REJECTED, key, reason, rejected=rejected)

    def _release(self, key: FileKey, state: _State) -> None:
        self._files.pop(key, None)
        self._bytes_held -= state.bytes_held
        state.data.clear()
        state.bytes_held = 0

    def _drop(self, key: FileKey, state: _State) -> None:
        state.digest.discard()
        self._release(key, state)
        if state.partial is not None:
            self._staging.remove(state.partial)

    def close(self) -> None:
        """The run is over and no upload reads a completed file any more: delete the
        staging folder and what is left in it (see :class:`~._safe_disk.StagingArea`).
        Also done when the Reassembler is collected or the process exits."""
        if self._staging is not None:
            self._staging.close()

    def release(self, completed: CompletedFile) -> None:
        """The fate of ``completed`` is settled (in Girder, failed for good, or handed
        over to another consumer): in disk mode (and for a file spilled in memory mode),
        delete its staging file, as OpenMSIStream 1.8.8 deletes a file rebuilt on disk
        once it was processed, whether the upload worked or not. A no-op for a file held
        in RAM and in both mode, which keeps the local copy. Never raises; releasing
        twice is harmless."""
        if self.mode is Mode.BOTH or completed.path is None or self._staging is None:
            return
        if completed.path.parent == self._staging.path:  # never a path of another run
            self._staging.remove(completed.path.name)

    def _remember(self, key: FileKey, outcome: str) -> None:
        self._finished[key] = outcome
        self._finished.move_to_end(key)
        while len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)

    def discard(self, file_key: FileKey) -> bool:
        """Forget a file in progress (and its partial file) or a finished key; True if known."""
        with self._lock:
            state = self._files.get(file_key)
            if state is not None:
                self._drop(file_key, state)
                return True
            return self._finished.pop(file_key, None) is not None

    def is_completed(self, file_key: FileKey) -> bool:
        """True if this generation completed (and is still remembered)."""
        with self._lock:
            return self._finished.get(file_key) == ""

    def received(self, file_key: FileKey) -> list[int] | None:
        """Chunk numbers received so far of a generation being assembled, else None."""
        with self._lock:
            state = self._files.get(file_key)
            return None if state is None else list(state.pieces)

    def mark_finished(self, file_key: FileKey) -> None:
        """Treat a generation as completed elsewhere (e.g. found in Girder): drop its
        partial state and recognise its later chunks as duplicates."""
        with self._lock:
            state = self._files.get(file_key)
            if state is not None:
                self._drop(file_key, state)
            self._remember(file_key, "")

    def progress(self, file_key: FileKey) -> FileProgress | None:
        """The :class:`FileProgress` of one generation being assembled, or None."""
        with self._lock:
            state = self._files.get(file_key)
            return None if state is None else self._progress_of(state)

    @staticmethod
    def _progress_of(s: _State) -> FileProgress:
        return FileProgress(s.rel_path, s.file_hash.hex(), len(s.pieces), s.n_total,
                            s.bytes_received, s.bytes_held, s.first_at, s.last_at)

    def in_progress(self) -> list[FileProgress]:
        """One :class:`FileProgress` per file generation still being assembled."""
        with self._lock:
            return [self._progress_of(s) for s in self._files.values()]

    # -- the memory budget ----------------------------------------------------------
    def spill(self, max_ram_bytes: int) -> int:
        """Move the bytes of files being rebuilt from RAM to their staging files, the
        largest file first, until at most ``max_ram_bytes`` are held; returns how many
        files were spilled. A spilled file goes on as in disk mode: its later chunks are
        written to the staging file, its sha512 is read back from there, and its
        :class:`CompletedFile` has a ``path`` and no ``data`` (the upload reads the disk).
        Nothing is lost: the bytes are on disk before RAM lets go of them. A file that
        cannot be written (a full disk) stays in RAM; the caller then pauses instead."""
        with self._lock:
            if self._bytes_held <= max_ram_bytes or not self._can_spill():
                return 0
            spilled = 0
            for state in sorted(self._files.values(), key=lambda s: -s.bytes_held):
                if self._bytes_held <= max_ram_bytes or not state.bytes_held:
                    break
                if not self._spill_one(state):
                    break
                spilled += 1
            return spilled

    def _can_spill(self) -> bool:
        """A staging folder exists, or (memory mode) can be made below output_dir."""
        if self._staging is None and self._spill_root is not None:
            try:
                self._disk = SafeDir(self._spill_root)
                self._staging = StagingArea(self._disk)
            except (OSError, ValueError) as exc:
                logger.warning("cannot make a staging folder below %s to spill files "
                               "being rebuilt to (%s): fetching pauses instead",
                               self._spill_root, exc)
                self._spill_root = None
                self._disk = self._staging = None
        return self._staging is not None

    def _spill_one(self, state: _State) -> bool:
        """One file's RAM to its staging file (written already in both mode)."""
        if state.storage is Storage.RAM:
            name = self._new_partial(state.rel_path, state.file_hash)
            try:
                for n, (i, data) in enumerate(sorted(state.data.items())):
                    self._staging.write(name, state.pieces[i][0], data, truncate=n == 0)
            except (OSError, OverflowError, ValueError) as exc:
                self._staging.remove(name)
                logger.warning("cannot spill %s to disk (%s): it stays in RAM",
                               state.rel_path, exc)
                return False
            state.partial = name
        # Chunks below next_hash_i are hashed (or queued with their own buffers); the
        # rest are read back from disk when the in-order prefix reaches them.
        self.spilled_files += 1
        self.spilled_bytes += state.bytes_held
        self._bytes_held -= state.bytes_held
        state.data.clear()
        state.bytes_held = 0
        state.storage = Storage.DISK
        return True

    # -- streamed uploads -----------------------------------------------------------
    def stream_view(self, file_key: FileKey) -> tuple[int | None, int, int] | None:
        """``(size, prefix_end, last_chunk_offset)`` of a file being assembled: its size
        once its last chunk is in (else None), the end of its in-order prefix (the bytes
        a streamed upload may send), and where its last chunk begins (the bytes from
        there are held back until the sha512 is checked). None if not assembling."""
        with self._lock:
            state = self._files.get(file_key)
            if state is None:
                return None
            prefix_i = state.next_hash_i - 1
            prefix_end = 0
            if prefix_i >= 1:
                offset, size, _ = state.pieces[prefix_i]
                prefix_end = offset + size
            last = state.pieces.get(state.n_total)
            return state.total, prefix_end, last[0] if last else -1

    def read_prefix(self, file_key: FileKey, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the in-order prefix of a file being assembled, from
        RAM or its staging file (one copy); None once the file is no longer assembling
        (completed, rejected, discarded): its :class:`CompletedFile` then has them."""
        with self._lock:
            state = self._files.get(file_key)
            if state is None:
                return None
            if state.storage is Storage.DISK:
                staging, name = self._staging, state.partial
            else:
                return self._read_ram(state, start, end)
        # Outside the lock (the poll thread must not wait for a disk read): the prefix's
        # bytes are written and never change; a file dropped meanwhile reads as None.
        out = bytearray()
        try:
            staging.hash_range(name, start, end, out.extend)
        except OSError:
            return None
        return bytes(out)

    @staticmethod
    def _read_ram(state: _State, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the in-order prefix held in RAM (one copy)."""
        parts, first = [], None
        for i in range(1, state.next_hash_i):
            offset, size, _ = state.pieces[i]
            if offset + size > start and offset < end:
                first = offset if first is None else first
                parts.append(state.data[i])
        if first is None:
            return b""
        return Pieces(parts).read_at(start - first, end - start)
