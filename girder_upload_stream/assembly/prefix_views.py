"""The parts of the :class:`~girder_upload_stream.assembly.reassembly.Reassembler` that
look at files in progress from outside: the memory budget (spilling RAM to staging
files) and the in-order prefix a streamed upload may send. A mixin: it works on the
reassembler's own groups, lock and staging area."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator

from girder_upload_stream.assembly.candidates import Candidate, Group
from girder_upload_stream.assembly.outcomes import Storage
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.assembly.safe_disk import SafeDir, StagingArea
from girder_upload_stream.wire.codec import FileKey

__all__ = ["PrefixViews"]

logger = logging.getLogger(__name__)


class PrefixViews:
    """Spilling and streamed-upload views of a reassembler's files in progress."""

    _files: dict[FileKey, Group]
    _new_partial: Callable[[str, bytes], str]

    # -- the memory budget ----------------------------------------------------------
    def spill(self, max_ram_bytes: int, last: frozenset[FileKey] = frozenset()) -> int:
        """Move the bytes of files being rebuilt from RAM to their staging files, the
        largest file first, until at most ``max_ram_bytes`` are held; returns how many
        files were spilled. A spilled file goes on as in disk mode: its later chunks are
        written to the staging file, its sha512 is read back from there, and its
        :class:`CompletedFile` has a ``path`` and no ``data`` (the upload reads the disk).
        Nothing is lost: the bytes are on disk before RAM lets go of them. A file that
        cannot be written (a full disk) stays in RAM; the caller then pauses instead.
        Extra variants of contested chunks stay in RAM (they are bounded). The files of
        ``last`` (streamed uploads about to send their bytes) are spilled last."""
        with self._lock:
            if self._bytes_held <= max_ram_bytes or not self._can_spill():
                return 0
            spilled = 0
            states = [c for g in self._files.values() for c in g.chunkings.values()]
            for state in sorted(states, key=lambda s: ((s.rel_path, s.file_hash) in last,
                                                       -s.bytes_held)):
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

    def _spill_one(self, state: Candidate) -> bool:
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
        state.marking = False  # on disk: no more rewind points (see _new_state)
        return True

    # -- streamed uploads -----------------------------------------------------------
    def _uncontested(self, file_key: FileKey) -> Candidate | None:
        """The one chunking of a file being assembled, if nothing competes with it: only
        then is its in-order prefix known to be the file's bytes."""
        group = self._files.get(file_key)
        if group is None or group.contested:
            return None
        return next(iter(group.chunkings.values()))

    def stream_view(self, file_key: FileKey) -> tuple[int | None, int, int] | None:
        """``(size, prefix_end, last_chunk_offset)`` of a file being assembled: its size
        once its last chunk is in (else None), the end of its in-order prefix (the bytes
        a streamed upload may send), and where its last chunk begins (the bytes from
        there are held back until the sha512 is checked). None if not assembling, or if
        competing copies of it are held (no prefix is known to be the file's)."""
        with self._lock:
            state = self._uncontested(file_key)
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
        (completed, rejected, discarded) or is contested: its :class:`CompletedFile`
        then has them. Also None when a chunk these bytes touch was found lying about
        its own hash (lazy check 2, :mod:`.lazy_checks`): the prefix then ends before it."""
        with self._lock:
            state = self._uncontested(file_key)
            if state is None:
                return None
            if state.storage is Storage.DISK:
                staging, name = self._staging, state.partial
                todo = [(i, *state.pieces[i]) for i in self._touched(state, start, end)
                        if i in state.unchecked]
                edits = state.edits
            elif not state.unchecked or self._check_served(file_key, state, start, end):
                return self._read_ram(state, start, end)
            else:
                return None
        # Outside the lock (the poll thread must not wait for a disk read): the prefix's
        # bytes are written and never change; a file dropped meanwhile reads as None.
        if todo and not self._checked_on_disk(file_key, state, edits, todo):
            return None
        out = bytearray()
        try:
            staging.hash_range(name, start, end, out.extend)
        except OSError:
            return None
        return bytes(out)

    @staticmethod
    def _touched(state: Candidate, start: int, end: int) -> Iterator[int]:
        """The in-order prefix's chunks not let go that bytes ``[start, end)`` touch."""
        for i in range(state.let_go_i + 1, state.next_hash_i):
            offset, size, _ = state.pieces[i]
            if offset >= end:
                return
            if offset + size > start:
                yield i

    def _checked_on_disk(self, file_key: FileKey, state: Candidate, edits: int,
                         todo: list[tuple[int, int, int, bytes]]) -> bool:
        """Lazy check 2 for a file on disk: read and hash the unchecked chunks
        ``todo`` outside the lock, then record the outcome unless the chunking changed
        meanwhile. False if one lied (it is dropped) or the outcome is stale."""
        verdicts = []
        for i, offset, size, chunk_hash in todo:
            digest = hashlib.sha512()
            try:
                self._staging.hash_range(state.partial, offset, offset + size, digest.update)
            except OSError:
                return False
            verdicts.append((i, digest.digest() == chunk_hash))
        with self._lock:
            if self._uncontested(file_key) is not state or state.edits != edits:
                return False
            if all(self._verdict(file_key, state, i, genuine) for i, genuine in verdicts):
                return True
            self._prune_empty(file_key)
            return False

    def let_go(self, file_key: FileKey, end: int) -> int:
        """Girder acknowledged bytes ``[0, end)`` of a file being streamed: let go of the
        chunks held in RAM that lie wholly below ``end`` (and in the in-order prefix, so
        already hashed or queued with their own buffers). Returns the bytes let go.

        Why: a big file's bytes would otherwise stay in RAM until it completes, and the
        memory budget would spill them to disk although Girder holds them already. The
        price: only the streamed upload can finish the file now; if it breaks, the file
        fails and its messages, never committed, are read again (see
        :attr:`CompletedFile.held_from`). Only the one chunking of an uncontested file in
        RAM lets go (a spilled file's bytes are on disk, not in RAM). With lazy checks,
        only up to the last rewind point of its digest: a liar found after it never
        needs the bytes let go (:meth:`FileDigest.rewind`)."""
        with self._lock:
            state = self._uncontested(file_key)
            if state is None or state.storage is not Storage.RAM:
                return 0
            chunks = list(self._held_below(state, end))
            if state.marking:
                chunks = self._checked_to_point(file_key, state, chunks)
            freed = 0
            for i, offset, size in chunks:
                if state.data.pop(i, None) is not None:
                    freed += size
                state.let_go_i, state.let_go_end = i, offset + size
            state.bytes_held -= freed
            self._bytes_held -= freed
            if chunks and state.marking:
                state.digest.forget_marks_below(state.let_go_end)
            return freed

    def ram_below(self, file_key: FileKey, end: int) -> int:
        """Bytes of a file being streamed that are in RAM, not let go yet, and wholly
        below ``end`` (what its upload will send, then let go, without another message)."""
        with self._lock:
            state = self._uncontested(file_key)
            if state is None or state.storage is not Storage.RAM:
                return 0
            return sum(size for _, _, size in self._held_below(state, end))

    def _checked_to_point(self, file_key: FileKey, state: Candidate,
                          chunks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """With lazy checks, the leading ``chunks`` that may be let go: checked (a
        streamed upload read them through :meth:`read_prefix`, so this rarely hashes),
        and ending at the last rewind point of the digest among them."""
        for n, (i, offset, size) in enumerate(chunks):
            if i in state.unchecked:
                if not self._check_served(file_key, state, offset, offset + size):
                    del chunks[n:]
                    break
        points = set(state.digest.mark_positions)
        while chunks and chunks[-1][1] + chunks[-1][2] not in points:
            chunks.pop()
        return chunks

    @staticmethod
    def _held_below(state: Candidate, end: int) -> Iterator[tuple[int, int, int]]:
        """``(index, offset, size)`` of the in-order prefix's chunks not let go yet that
        lie wholly below ``end``, in order: what :meth:`let_go` frees and
        :meth:`ram_below` counts."""
        for i in range(state.let_go_i + 1, state.next_hash_i):
            offset, size, _ = state.pieces[i]
            if offset + size > end:
                return
            yield i, offset, size

    @staticmethod
    def _read_ram(state: Candidate, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the in-order prefix held in RAM (one copy); None
        for bytes let go already."""
        if start < state.let_go_end:
            return None
        parts, first = [], None
        for i in range(state.let_go_i + 1, state.next_hash_i):
            offset, size, _ = state.pieces[i]
            if offset + size > start and offset < end:
                first = offset if first is None else first
                parts.append(state.data[i])
        if first is None:
            return b""
        return Pieces(parts).read_at(start - first, end - start)
