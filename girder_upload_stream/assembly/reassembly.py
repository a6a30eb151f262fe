"""Rebuild whole files from OpenMSIStream chunks that arrive in any order.

A file generation is identified by ``(rel_path, file_hash)``, so two generations of the
same path assemble side by side. Chunks may arrive in any order, interleaved with other
files, and more than once. Each chunk is placed by its index and offset; a chunk that
fits with the chunks of its chunking present is stored (O(log k) for the k present,
whatever ``n_total_chunks`` it claims); one that does not -- other bytes for a chunk
number held, or a placement the chunks present contradict -- is kept as a competing
variant, and a chunk with another ``n_total_chunks`` starts another chunking of the same
file. Only the whole-file sha512 decides which bytes are the file
(:mod:`.copies`): no single message can veto the genuine copy. A chunk that cannot
belong to a file under the size limit is refused alone (its message is rejected, the
file is not); a path that reaches a folder the consumer keeps its own files in, or that
the file system refuses, rejects its file at once (:mod:`.chunk_rules`).
When every choice of the variants held fails the sha512, the file is rejected, and
nothing of it is remembered: a later copy is rebuilt afresh.

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
thread adding chunks; competing variants are held in RAM (bounded, :mod:`.copies`).

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from girder_upload_stream.assembly.candidates import Candidate, Group
from girder_upload_stream.assembly.chunk_rules import (placement_problem, reserved_paths,
                                                       reserved_problem, size_problem,
                                                       staging_name)
from girder_upload_stream.assembly.completion import MISMATCHED_HASH, Completion
from girder_upload_stream.assembly.file_queries import FileQueries
from girder_upload_stream.assembly.copies import (MAX_CHUNKINGS, MAX_EXTRA_BYTES,
                                                  MAX_EXTRA_BYTES_TOTAL, MAX_EXTRA_VARIANTS)
from girder_upload_stream.assembly.hashing import HashPipe
from girder_upload_stream.assembly.lazy_checks import CHUNK_HASH_MISMATCH, LazyChecks, chunk_hash_ok
from girder_upload_stream.assembly.outcomes import AddResult, AddStatus, Mode, Storage
from girder_upload_stream.shared_types import CompletedFile, FileProgress, RejectedFile
from girder_upload_stream.assembly.prefix_views import PrefixViews
from girder_upload_stream.assembly.safe_disk import PATH_ERRNOS, STAGING_DIR, SafeDir, StagingArea
from girder_upload_stream.errors import StorageError
from girder_upload_stream.wire.codec import (DEFAULT_MAX_FILE_BYTES, MAX_POSSIBLE_FILE_BYTES,
                                             Chunk, FileKey, path_problem)

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
    "MISMATCHED_HASH",
]

class _Rejection(Exception):
    """Internal: the file must be dropped for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reassembler(Completion, PrefixViews, LazyChecks, FileQueries):
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

    ``lazy_checks``: the chunks added were decoded without checking their own sha512
    (``decode_chunk(check_hash=False)``); it is checked only where it matters
    (:mod:`.lazy_checks`), and the chunks found lying are reported by :meth:`take_liars`.
    """

    def __init__(self, mode: Mode | str = Mode.MEMORY, output_dir: Path | str | None = None,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES, *,
                 reserved: Iterable[str] = (), clock: Callable[[], float] = time.time,
                 max_finished: int = 10_000, hash_pipe: HashPipe | None = None,
                 lazy_checks: bool = False) -> None:
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
        self._files: dict[FileKey, Group] = {}
        # Files none of whose copies verified, kept for a later chunk (see .copies).
        self._parked: OrderedDict[FileKey, Group] = OrderedDict()
        # Finished generations: "" completed, else why its path is refused for good.
        self._finished: OrderedDict[FileKey, str] = OrderedDict()
        self._max_finished = max_finished
        self._serial = 0
        self._bytes_held = 0
        self._extra_bytes = 0  # competing variants' bytes over every file (in _bytes_held)
        self._hashes = hash_pipe or HashPipe()
        self.lazy_checks = lazy_checks
        self._liars = []
        self._stored_now = None
        self._lock = threading.Lock()
        #: At most this many file generations in progress (None: no bound); a chunk that
        #: would start one more is refused (``AddResult.full``).
        self.max_files_in_progress: int | None = None

    @property
    def bytes_held(self) -> int:
        """Chunk bytes currently held in RAM across all files (for back-pressure)."""
        return self._bytes_held

    @property
    def staging_dir(self) -> Path | None:
        """This run's staging folder (disk and both modes), else None."""
        return self._staging.path if self._staging else None

    @property
    def files_in_progress(self) -> int:
        """File generations being assembled (each holds at most a few staging files)."""
        return len(self._files)

    def add(self, chunk: Chunk, tag: object = None) -> AddResult:
        """Add one decoded chunk and say what happened (see :class:`AddStatus`);
        ``tag`` names it if it is later found lying (:meth:`take_liars`).

        Raises :class:`StorageError` (transient) if the disk fails for a reason that is
        not the file's fault; the chunk is then not recorded and may be added again.
        Raises nothing else: whatever its fields, a chunk is at worst refused, or its
        file's rejection.
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
            group = self._files.get(key)
            if group is None and key in self._parked:
                if self._parked[key].holds(chunk):  # nothing new for a failed file
                    return AddResult(AddStatus.DUPLICATE, key, "chunk of a file whose "
                                     "copies failed the sha512, received before",
                                     of_rejected=True)
                group = self._parked.pop(key)
                self._files[key] = group
            problem = size_problem(chunk, self.max_file_bytes)
            if problem:  # the chunk's own claim: it rejects itself, never the file
                return AddResult(AddStatus.REFUSED, key, problem)
            try:
                if group is None:
                    self._check_path(chunk)
                    if self.max_files_in_progress is not None \
                            and len(self._files) >= self.max_files_in_progress:
                        return AddResult(AddStatus.REFUSED, key, (
                            f"too many files in progress: {len(self._files)} being rebuilt "
                            f"(--max_files_in_progress)"), full=True)
                    group = Group()
                since, self._stored_now = len(self._liars), None
                result = self._add_to_group(group, chunk, key, now, tag)
                if len(self._liars) > since:
                    result = self._refuse_liar(key, chunk, since, result)
                    self._prune_empty(key)
                return result
            except _Rejection as rejection:  # the path: every copy has it
                return self._reject(key, group, chunk, now, rejection.reason)

    def _check_path(self, chunk: Chunk) -> None:
        problem = path_problem(chunk.filename, chunk.subdir, chunk.filename_append)
        if problem:
            raise _Rejection(f"unsafe path: {problem}")
        problem = reserved_problem(chunk.rel_path, self._reserved)
        if problem:
            raise _Rejection(problem)

    def _new_state(self, chunk: Chunk, now: float) -> Candidate:
        partial = None
        if self.mode is not Mode.MEMORY:
            partial = self._new_partial(chunk.rel_path, chunk.file_hash)
        storage = {Mode.MEMORY: Storage.RAM, Mode.DISK: Storage.DISK,
                   Mode.BOTH: Storage.RAM_AND_DISK}[self.mode]
        state = Candidate(chunk, now, partial, self._hashes.digest(), storage)
        # Rewind points while the bytes are in RAM (bounded by the budget): a file on
        # disk can always be hashed again from its start, and never lets bytes go.
        state.marking = self.lazy_checks and storage is not Storage.DISK
        return state

    def _new_partial(self, rel_path: str, file_hash: bytes) -> str:
        self._serial += 1
        return staging_name(rel_path, file_hash, self._serial)

    def _add_to_group(self, group: Group, chunk: Chunk, key: FileKey,
                      now: float, tag: object = None) -> AddResult:
        """The chunk into its chunking (a new one, within :data:`MAX_CHUNKINGS`)."""
        state = group.chunkings.get(chunk.n_total_chunks)
        if state is None:
            if len(group.chunkings) >= MAX_CHUNKINGS:
                return AddResult(AddStatus.REFUSED, key,
                                 f"too many chunkings of one file: {MAX_CHUNKINGS} chunk "
                                 f"counts held already, {chunk.n_total_chunks} refused")
            state = self._new_state(chunk, now)
        return self._add_to(group, state, chunk, key, now, tag)

    def _add_to(self, group: Group, state: Candidate, chunk: Chunk, key: FileKey,
                now: float, tag: object = None) -> AddResult:
        i, offset, size = chunk.chunk_i, chunk.chunk_offset, chunk.size
        checked = not self.lazy_checks
        if i in state.unchecked and state.pieces[i] == (offset, size, chunk.chunk_hash):
            refused = self._settle_claim(state, chunk, key)  # lazy check 1
            if refused:
                return AddResult(AddStatus.REFUSED, key, refused, contested=group.contested)
            checked = True
        if state.holds(chunk):
            state.last_at = now
            if state.due:  # completion failed before (local storage): retry
                return self._complete(group, state, key, now)
            return AddResult(AddStatus.DUPLICATE, key, f"chunk {i} already received",
                             contested=group.contested)
        if i not in state.pieces and placement_problem(state, i, offset, size) is None:
            self._store(group, state, chunk, key, checked, tag)
        else:
            refused = self._extra_problem(state, size)
            if not refused and not checked and not chunk_hash_ok(chunk.data, chunk.chunk_hash):
                refused = CHUNK_HASH_MISMATCH  # competing copies are checked on arrival
            if refused:
                return AddResult(AddStatus.REFUSED, key, refused, contested=group.contested)
            state.add_extra(chunk)
            self._bytes_held += size
            self._extra_bytes += size
        state.last_at = now
        if state.covered < state.n_total:
            return AddResult(AddStatus.ACCEPTED, key, contested=group.contested)
        return self._complete(group, state, key, now)

    def _extra_problem(self, state: Candidate, size: int) -> str | None:
        """Why another variant cannot be kept (the bounds of :mod:`.copies`), or None."""
        if state.n_extras >= MAX_EXTRA_VARIANTS:
            return (f"too many competing copies of one file's chunks: {MAX_EXTRA_VARIANTS} "
                    f"held already")
        if state.extra_bytes + size > MAX_EXTRA_BYTES \
                or self._extra_bytes + size > MAX_EXTRA_BYTES_TOTAL:
            return "too many bytes of competing copies held already"
        return None

    def _store(self, group: Group, state: Candidate, chunk: Chunk, key: FileKey,
               checked: bool = True, tag: object = None) -> None:
        """Store ``chunk`` as its number's primary; unless ``checked``, its own hash is
        left for the lazy checks, and ``tag`` names it if it lies."""
        i = chunk.chunk_i
        if state.partial is not None:
            try:
                self._staging.write(state.partial, chunk.chunk_offset, chunk.data,
                                    truncate=not state.pieces)
            except (OSError, OverflowError, ValueError) as exc:
                if not state.pieces:  # a chunking not held yet: nobody else removes it
                    self._staging.remove(state.partial)
                self._raise_os_error(exc, state.rel_path)
        if not state.pieces:
            self._files[key] = group
            group.chunkings[state.n_total] = state
        state.pieces[i] = (chunk.chunk_offset, chunk.size, chunk.chunk_hash)
        if not checked:
            state.unchecked.add(i)
            state.tags[i] = tag
            self._stored_now = (id(state), i)
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

    def _hash_from_disk(self, state: Candidate) -> None:
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

    def _reject(self, key: FileKey, group: Group | None, chunk: Chunk, now: float,
                reason: str) -> AddResult:
        """The file is dropped and its key refused for good (its path is refused)."""
        lead = group.lead if group is not None and group.chunkings else None
        rejected = RejectedFile(
            chunk.rel_path, chunk.file_hash, reason,
            lead.covered if lead else 0, lead.n_total if lead else chunk.n_total_chunks,
            group.first_at if lead else now, now)
        if group is not None:
            self._release(key, group)
        self._remember(key, reason)
        return AddResult(AddStatus.REJECTED, key, reason, rejected=rejected)

    def _release(self, key: FileKey, group: Group, keep: Candidate | None = None) -> None:
        """The group leaves; its RAM is let go, the staging files of every chunking but
        ``keep`` (the verified one) are deleted."""
        self._files.pop(key, None)
        for state in group.chunkings.values():
            self._bytes_held -= state.bytes_held + state.extra_bytes
            self._extra_bytes -= state.extra_bytes
            state.data.clear()
            state.extras.clear()
            state.bytes_held = state.extra_bytes = 0
            if state is not keep:
                state.digest.discard()
                if state.partial is not None:
                    self._staging.remove(state.partial)

    def _forget(self, key: FileKey) -> bool:
        """Drop a file in progress or parked; True if there was one."""
        group = self._files.get(key) or self._parked.pop(key, None)
        if group is not None:
            self._release(key, group)
        return group is not None

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
