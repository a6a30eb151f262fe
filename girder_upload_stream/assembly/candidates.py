"""What the reassembler holds of one file generation in progress: a :class:`Group` of
:class:`Candidate` chunkings (one per ``n_total_chunks`` received), each with its primary
pieces (stored in RAM or its staging file, hashed in order as they come) and the extra
variants of its chunk numbers (other bytes received for a number it holds, or bytes that
do not fit with its pieces), kept until the whole-file sha512 decides
(:mod:`girder_upload_stream.assembly.copies`). Pure data with small helpers; the
:class:`~girder_upload_stream.assembly.reassembly.Reassembler` does the I/O."""

from __future__ import annotations

from girder_upload_stream.assembly.copies import Variant
from girder_upload_stream.assembly.hashing import FileDigest
from girder_upload_stream.assembly.outcomes import Storage
from girder_upload_stream.shared_types import FileProgress
from girder_upload_stream.wire.codec import Chunk

__all__ = ["Candidate", "Group"]


class Candidate:
    """One chunking of a file generation in progress."""

    __slots__ = ("rel_path", "file_hash", "n_total", "file_mtime", "pieces", "order",
                 "data", "total", "bytes_received", "bytes_held", "digest",
                 "next_hash_i", "first_at", "last_at", "partial", "storage", "extras",
                 "extra_bytes", "n_extras", "checked_at", "failed", "let_go_i", "let_go_end",
                 "unchecked", "tags", "marking", "edits")

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
        self.extras: dict[int, list[Variant]] = {}  # other bytes per chunk number (RAM)
        self.extra_bytes = 0
        self.n_extras = 0
        self.checked_at = -1  # variants held when last searched in vain (-1: never)
        self.failed = False  # every choice held was hashed and none verified
        # Chunks 1..let_go_i (bytes [0, let_go_end)) were let go: in Girder already.
        self.let_go_i = 0
        self.let_go_end = 0
        # Lazy chunk checks (.lazy_checks): primary chunk numbers whose bytes were not
        # compared with their own chunk hash, each message's tag (to name a liar), and
        # whether the digest keeps rewind points.
        self.unchecked: set[int] = set()
        self.tags: dict[int, object] = {}
        self.marking = False
        self.edits = 0  # liars dropped so far: a check made outside the lock is stale

    def hash_block(self, block: memoryview) -> None:
        """Hash bytes read back from disk (into a reused buffer) before returning."""
        self.digest.update(block, now=True)

    def hash_piece(self, data: bytes | memoryview, now: bool) -> None:
        """Hash the next chunk of the in-order prefix (``now``: its digest is due)."""
        self.digest.update(data, now=now, mark=self.marking)
        self.next_hash_i += 1

    def holds(self, chunk: Chunk) -> bool:
        """True if this very chunk (offset, size, chunk hash) is held already."""
        signature = (chunk.chunk_offset, chunk.size, chunk.chunk_hash)
        if self.pieces.get(chunk.chunk_i) == signature:
            return True
        return any(v.signature == signature for v in self.extras.get(chunk.chunk_i, ()))

    @property
    def covered(self) -> int:
        """How many chunk numbers have at least one variant."""
        if not self.extras:
            return len(self.pieces)
        return len(self.pieces) + sum(1 for i in self.extras if i not in self.pieces)

    @property
    def n_variants(self) -> int:
        """Variants held: primary pieces and extras (grows with every one kept)."""
        return len(self.pieces) + self.n_extras

    @property
    def due(self) -> bool:
        """Every chunk number has a variant and the variants held were not all tried."""
        return self.covered == self.n_total and self.checked_at != self.n_variants

    def add_extra(self, chunk: Chunk) -> None:
        """Keep ``chunk`` as another variant of its number (bytes in RAM)."""
        self.extras.setdefault(chunk.chunk_i, []).append(Variant(
            chunk.chunk_i, chunk.chunk_offset, chunk.size, chunk.chunk_hash, chunk.data))
        self.extra_bytes += chunk.size
        self.n_extras += 1
        self.failed = False

    def options(self, i: int) -> list[Variant]:
        """Chunk ``i``'s variants, the primary first (its bytes: RAM, or None on disk)."""
        out = []
        piece = self.pieces.get(i)
        if piece is not None:
            out.append(Variant(i, *piece, self.data.get(i)))
        out.extend(self.extras.get(i, ()))
        return out


class Group:
    """Every chunking of one file generation in progress, by chunk count."""

    __slots__ = ("chunkings",)

    def __init__(self) -> None:
        self.chunkings: dict[int, Candidate] = {}

    @property
    def contested(self) -> bool:
        """More than one chunking, or other bytes for some chunk number."""
        return len(self.chunkings) > 1 or any(c.extras for c in self.chunkings.values())

    @property
    def lead(self) -> Candidate:
        """The chunking with the most chunk numbers covered (the oldest on ties)."""
        return max(self.chunkings.values(), key=lambda c: c.covered)

    @property
    def first_at(self) -> float:
        return min(c.first_at for c in self.chunkings.values())

    @property
    def last_at(self) -> float:
        return max(c.last_at for c in self.chunkings.values())

    @property
    def extra_bytes(self) -> int:
        return sum(c.extra_bytes for c in self.chunkings.values())

    @property
    def ram_bytes(self) -> int:
        """Bytes held in RAM: primary pieces not on disk, and extra variants."""
        return sum(c.bytes_held + c.extra_bytes for c in self.chunkings.values())

    def holds(self, chunk) -> bool:
        """True if the chunking of ``chunk`` holds this very chunk."""
        state = self.chunkings.get(chunk.n_total_chunks)
        return state is not None and state.holds(chunk)

    def progress(self) -> FileProgress:
        """How far its leading chunking got."""
        s = self.lead
        return FileProgress(s.rel_path, s.file_hash.hex(), s.covered, s.n_total,
                            s.bytes_received, s.bytes_held, self.first_at, self.last_at)

    def all_failed(self) -> bool:
        """Every chunking was complete and none of its choices verified."""
        return all(c.failed for c in self.chunkings.values())
