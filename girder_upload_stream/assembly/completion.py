"""Completion of a file being rebuilt: once every chunk number of a chunking has a
variant, the verified choice of bytes becomes the :class:`CompletedFile` (published to
its place in both mode, its staging file rewritten when a competing variant won); when
no choice verifies, the chunking has failed, and the file with it once every chunking
has (it is then *parked*, see :mod:`.copies`). A mixin of the
:class:`~girder_upload_stream.assembly.reassembly.Reassembler`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from girder_upload_stream.assembly.candidates import Candidate, Group
from girder_upload_stream.assembly.copies import (MAX_PARKED, MAX_PARKED_RAM, Found, Search,
                                                  Variant, find_verified)
from girder_upload_stream.assembly.outcomes import AddResult, AddStatus, Mode, Storage
from girder_upload_stream.shared_types import CompletedFile, RejectedFile
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.wire.codec import FileKey

__all__ = ["Completion", "MISMATCHED_HASH"]

#: The start of the reason of a file none of whose copies verified.
MISMATCHED_HASH = "mismatched hash: sha512 of the rebuilt file differs from file_hash"


def _split(rel_path: str) -> tuple[str, str]:
    subdir, _, name = rel_path.rpartition("/")
    return subdir, name



class Completion:
    """Verify, publish or fail a chunking whose every number has a variant."""

    _parked: OrderedDict[FileKey, Group]

    # -- completion ------------------------------------------------------------------
    def _complete(self, group: Group, state: Candidate, key: FileKey,
                  now: float) -> AddResult:
        """Every chunk number of ``state`` has a variant: the verified choice is the
        file; if none verifies, this chunking failed (the file, once all have)."""
        if not state.extras or state.let_go_i:
            # Bytes let go (streamed): only the primary pieces' own digest can verify.
            found, failed = self._check_primary(state), True
        else:
            search = self._search(state)
            found, failed = search.found, search.hashed > 0 or not search.exhausted
        if found is None and failed and state.unchecked and self._check_unchecked(key, state):
            # Lazy check 3: chunks that lied were dropped; wait for good copies (or try
            # at once what is still held, when competing copies cover their numbers).
            if state.due:
                return self._complete(group, state, key, now)
            return AddResult(AddStatus.ACCEPTED, key, contested=group.contested)
        if found is None and state.let_go_i:
            return self._let_go_failed(group, state, key, now)
        if found is None:
            if not failed:  # a hole no variant fills yet: wait for more chunks
                return AddResult(AddStatus.ACCEPTED, key, contested=group.contested)
            return self._chunking_failed(group, state, key, now)
        data: Pieces | None = None
        if state.storage is not Storage.DISK:
            data = Pieces([v.data for v in found.variants[state.let_go_i:]],
                          start=state.let_go_end)
        path = None
        if state.partial is not None and any(state.pieces.get(v.chunk_i) != v.signature
                                             for v in found.variants):
            self._rewrite_staging(state, found)
        if self.mode is not Mode.BOTH and state.storage is Storage.DISK:
            path = self._staging.path_of(state.partial)
        elif state.partial is not None:
            subdir, final_name = _split(state.rel_path)
            try:
                self._disk.publish(self._staging.fd, state.partial, subdir, final_name)
            except (OSError, ValueError) as exc:
                self._raise_os_error(exc, state.rel_path)
            path = self._disk.root.joinpath(*state.rel_path.split("/"))
        completed = CompletedFile(state.rel_path, state.file_hash, found.sha256,
                                  found.size, state.n_total, group.first_at, now,
                                  state.file_mtime, data, path, state.let_go_end)
        contested = group.contested
        self._release(key, group, keep=state)
        self._remember(key, "")
        return AddResult(AddStatus.COMPLETED, key, completed=completed, contested=contested)

    def _check_primary(self, state: Candidate) -> Found | None:
        """The incremental digest of the primary pieces, the common case."""
        if state.storage is Storage.DISK:
            self._finish_disk_hash(state)
        if state.digest.sha512() != state.file_hash:
            return None
        variants = tuple(state.options(i)[0] for i in range(1, state.n_total + 1))
        return Found(variants, state.total, state.digest.sha256_hex())

    def _search(self, state: Candidate) -> Search:
        """Hash the choices of variants held (bounded: :func:`find_verified`)."""
        state.checked_at = state.n_variants
        staging, name = self._staging, state.partial

        def feed(variant: Variant, update: Callable) -> None:
            if variant.data is not None:
                update(variant.data)
            else:
                staging.hash_range(name, variant.offset, variant.offset + variant.size, update)

        try:
            return find_verified(state.n_total, state.options, feed, state.file_hash)
        except (OSError, OverflowError, ValueError) as exc:
            state.checked_at = -1  # tried again by the next chunk
            self._raise_os_error(exc, state.rel_path)
            raise  # not reached: _raise_os_error raises

    def _rewrite_staging(self, state: Candidate, found: Found) -> None:
        """The staging file holds the primary pieces: write the winning extras over them
        and cut it to the file's size, so that it holds the verified bytes."""
        try:
            for variant in found.variants:
                if variant.data is not None and state.pieces.get(variant.chunk_i) != \
                        variant.signature:
                    self._staging.write(state.partial, variant.offset, variant.data,
                                        truncate=False)
            self._staging.truncate(state.partial, found.size)
        except (OSError, OverflowError, ValueError) as exc:
            self._raise_os_error(exc, state.rel_path)

    def _chunking_failed(self, group: Group, state: Candidate, key: FileKey,
                         now: float) -> AddResult:
        """No choice held verifies: drop the variants' hash state; the file is rejected
        once every chunking has failed (and nothing of it is remembered)."""
        state.failed = True
        state.checked_at = state.n_variants
        state.digest.discard()
        state.digest = self._hashes.digest()
        if not group.all_failed():
            return AddResult(AddStatus.ACCEPTED, key,
                             f"{MISMATCHED_HASH} (chunking of {state.n_total}); other "
                             f"copies are still being rebuilt", contested=True)
        reason = (f"{MISMATCHED_HASH} (no choice of the {len(group.chunkings)} chunking(s) "
                  f"and {sum(c.n_extras for c in group.chunkings.values())} competing "
                  f"chunk(s) held verifies)")
        rejected = RejectedFile(state.rel_path, state.file_hash, reason, state.covered,
                                state.n_total, group.first_at, now, retry=True)
        self._park(key, group)
        return AddResult(AddStatus.REJECTED, key, reason, rejected=rejected)

    def _let_go_failed(self, group: Group, state: Candidate, key: FileKey,
                       now: float) -> AddResult:
        """The sha512 of a chunking whose streamed prefix was let go failed: no other
        choice can be hashed without those bytes, so the file is rejected at once (not
        parked) and its messages, never committed, are read again by the next run."""
        reason = (f"{MISMATCHED_HASH} (the first {state.let_go_end} bytes were streamed "
                  f"to Girder and let go: no competing copy can be tried in this run)")
        rejected = RejectedFile(state.rel_path, state.file_hash, reason, state.covered,
                                state.n_total, group.first_at, now, retry=True)
        self._release(key, group)
        return AddResult(AddStatus.REJECTED, key, reason, rejected=rejected)

    def _park(self, key: FileKey, group: Group) -> None:
        """Keep a failed file's chunks (no commit held) for a later chunk, within
        :data:`MAX_PARKED` files and :data:`MAX_PARKED_RAM` bytes, oldest dropped."""
        self._files.pop(key, None)
        self._parked[key] = group
        while self._parked and (len(self._parked) > MAX_PARKED or sum(
                g.ram_bytes for g in self._parked.values()) > MAX_PARKED_RAM):
            old_key, old = self._parked.popitem(last=False)
            self._release(old_key, old)

    def _finish_disk_hash(self, state: Candidate) -> None:
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

