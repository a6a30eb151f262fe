"""Lazy chunk checks: a chunk's own sha512 is compared with its bytes only when it could
matter, not as it arrives.

Why: checking every chunk's sha512 on arrival hashes every byte a second time (the
whole-file sha512 is the first), about a fifth of the consumer's CPU on big files.
When the whole-file sha512 of the primary chunks matches ``file_hash``, every one of
them holds the file's true bytes, so their own hashes add nothing. A chunk's hash is
therefore checked only where an unverified chunk could otherwise decide something:

1. **A copy claims to be a held chunk** (same offset, size and chunk hash) whose bytes
   were never checked: the newcomer is checked; if it lies it is refused alone, else
   the held bytes are compared with it (in RAM) or checked (on disk). A held chunk that
   lies is dropped and the newcomer takes its place, so a liar that came first cannot
   make the genuine copy look like a duplicate.
2. **A streamed upload is about to send bytes** before the file is complete: the chunks
   it reads are checked first (:meth:`PrefixViews.read_prefix`), since bytes sent and
   let go can no longer be taken back. Only those bytes: 24 of 1,024 MiB in the
   big-file benchmark.
3. **The whole-file sha512 fails**: the unchecked chunks held are checked; the liars are
   dropped and the file waits for good copies, as it would have had they been refused
   on arrival. Only when none lies does the file fail (:mod:`.completion`).

A liar dropped after it was stored must leave the in-order digest too: the digest
keeps rewind points at chunk ends (:meth:`FileDigest.rewind`), and a streamed upload
lets go of bytes only up to such a point, so the bytes before a liar never need to be
read again. Every liar is reported (:meth:`LazyChecks.take_liars`) with the tag its
chunk was added with, so that its message is recorded as rejected, as one refused on
arrival is. A mixin of the :class:`~girder_upload_stream.assembly.reassembly.Reassembler`.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

from girder_upload_stream.assembly.candidates import Candidate, Group
from girder_upload_stream.assembly.outcomes import AddResult, AddStatus, Storage
from girder_upload_stream.wire.codec import Chunk, FileKey

__all__ = ["LazyChecks", "Liar", "CHUNK_HASH_MISMATCH", "chunk_hash_ok"]

#: The reason a chunk whose bytes do not match its own chunk hash is refused with.
CHUNK_HASH_MISMATCH = "chunk hash mismatch"


def chunk_hash_ok(data: bytes | memoryview, chunk_hash: bytes) -> bool:
    """True if ``data`` is what ``chunk_hash`` (its sha512) says."""
    return hashlib.sha512(data).digest() == chunk_hash


@dataclass(frozen=True, slots=True)
class Liar:
    """A chunk stored unchecked and found lying about its own hash, then dropped:
    ``tag`` is what it was added with (its message), None if nothing was given."""

    tag: object
    rel_path: str
    file_key: FileKey
    chunk_i: int
    current: bool = False  # the chunk being added (refused at once, not reported)


class LazyChecks:
    """The checks above, on the reassembler's own groups, lock and staging area."""

    _files: dict[FileKey, Group]
    _liars: list[Liar]
    _stored_now: tuple[int, int] | None  # (id of the chunking, number) stored by add()

    def take_liars(self) -> list[Liar]:
        """The liars dropped since the last call (each reported once)."""
        with self._lock:
            liars, self._liars = self._liars, []
            return liars

    def _held_bytes(self, state: Candidate, i: int) -> bytes | memoryview:
        """Primary chunk ``i``'s bytes, from RAM or its staging file."""
        data = state.data.get(i)
        if data is not None:
            return data
        offset, size, _ = state.pieces[i]
        out = bytearray()
        try:
            self._staging.hash_range(state.partial, offset, offset + size, out.extend)
        except (OSError, OverflowError, ValueError) as exc:
            self._raise_os_error(exc, state.rel_path)
        return out

    def _settle_claim(self, state: Candidate, chunk: Chunk, key: FileKey) -> str | None:
        """Check 1: ``chunk`` has the signature of unchecked primary ``chunk_i``. Returns
        why the chunk is refused, or None: it is then a duplicate of a primary found
        genuine, or the primary lied and was dropped (the chunk may take its place)."""
        i = chunk.chunk_i
        if not chunk_hash_ok(chunk.data, chunk.chunk_hash):
            return CHUNK_HASH_MISMATCH
        held = state.data.get(i)
        self._verdict(key, state, i, held == chunk.data if held is not None else
                      chunk_hash_ok(self._held_bytes(state, i), chunk.chunk_hash))
        return None

    def _check_unchecked(self, key: FileKey, state: Candidate) -> int:
        """Check 3: every unchecked primary of ``state`` against its own hash; the liars
        are dropped. Returns how many were."""
        return sum(not self._verdict(key, state, i, chunk_hash_ok(
            self._held_bytes(state, i), state.pieces[i][2])) for i in sorted(state.unchecked))

    def _check_served(self, key: FileKey, state: Candidate, start: int, end: int) -> bool:
        """Check 2 for chunks held in RAM: the unchecked chunks of the in-order prefix
        that bytes ``[start, end)`` touch. False if one lied (it is dropped, and the
        prefix now ends before it). Hashes under the lock: at most one streamed block
        (8 MiB, about 15 ms here), and only for bytes sent before their file completes."""
        for i in [i for i in self._touched(state, start, end) if i in state.unchecked]:
            if not self._verdict(key, state, i, chunk_hash_ok(self._held_bytes(state, i),
                                                              state.pieces[i][2])):
                self._prune_empty(key)
                return False
        return True

    def _verdict(self, key: FileKey, state: Candidate, i: int, genuine: bool) -> bool:
        """Record what checking unchecked primary ``i`` showed: checked, or a liar
        dropped. Returns ``genuine``. (A caller outside :meth:`add` then prunes the
        chunking a liar left empty; ``add`` prunes once it is done.)"""
        if genuine:
            state.unchecked.discard(i)
            state.tags.pop(i, None)
        else:
            self._drop_liar(key, state, i)
        return genuine

    def _drop_liar(self, key: FileKey, state: Candidate, i: int) -> None:
        """Primary ``i`` lied about its own hash: it leaves the chunking (the number is
        missing again) and the in-order digest, and is reported."""
        offset, size, _ = state.pieces.pop(i)
        del state.order[bisect.bisect_left(state.order, i)]
        if state.data.pop(i, None) is not None:
            state.bytes_held -= size
            self._bytes_held -= size
        state.bytes_received -= size
        if i == state.n_total:
            state.total = None
        state.unchecked.discard(i)
        self._liars.append(Liar(state.tags.pop(i, None), state.rel_path, key, i,
                                self._stored_now == (id(state), i)))
        state.failed, state.checked_at, state.edits = False, -1, state.edits + 1
        if state.next_hash_i > i:
            self._rewind(state, i, offset)

    def _rewind(self, state: Candidate, i: int, offset: int) -> None:
        """The digest has hashed (or queued) liar ``i`` at ``offset``: go back to the
        latest rewind point before it, not below the bytes let go, and hash again the
        chunks held from there."""
        at = state.digest.rewind(offset, state.let_go_end)
        j = None if at is None else i if at == offset else next(
            (k for k in range(i - 1, state.let_go_i, -1) if state.pieces[k][0] == at), None)
        if j is None:
            # No point to go back to (or, impossibly, not a chunk's start): the digest
            # keeps the liar's bytes, so the sha512 fails and only a failure can follow.
            return
        state.next_hash_i = j
        if state.storage is Storage.DISK:
            self._hash_from_disk(state)
            return
        while state.next_hash_i in state.data:
            state.hash_piece(state.data[state.next_hash_i], False)

    def _prune_empty(self, key: FileKey) -> None:
        """Chunkings that liars left empty leave their group; an empty group leaves."""
        group = self._files.get(key)
        if group is None:
            return
        for n_total, state in list(group.chunkings.items()):
            if not state.pieces and not state.extras:
                del group.chunkings[n_total]
                state.digest.discard()
                if state.partial is not None:
                    self._staging.remove(state.partial)
        if not group.chunkings:
            del self._files[key]

    def _refuse_liar(self, key: FileKey, chunk: Chunk, since: int,
                     result: AddResult) -> AddResult:
        """The chunk being added was itself found lying (check 3 at its completion):
        it is refused alone, as on arrival, rather than reported as a liar later.
        ``since``: how many liars were queued before it was added."""
        for n in range(since, len(self._liars)):
            liar = self._liars[n]
            if liar.current:
                if result.status is AddStatus.ACCEPTED:
                    del self._liars[n]
                    return AddResult(AddStatus.REFUSED, key, CHUNK_HASH_MISMATCH,
                                     contested=result.contested)
                break
        return result
