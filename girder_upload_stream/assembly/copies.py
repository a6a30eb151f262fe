"""Competing copies of one file: let the whole-file sha512 pick the bytes, not the first
message that came.

A file generation ``(rel_path, file_hash)`` may receive, besides its genuine chunks,
chunks with the same number but other bytes (a forged or corrupted copy), or a second
*chunking* (the same file sent again with another chunk size: another ``n_total_chunks``).
None of them may decide the file's fate on its own word: only the sha512 of whole bytes
can. So the :class:`~girder_upload_stream.assembly.reassembly.Reassembler` keeps, per
chunking, the first bytes of each chunk number (the *primary* variant, stored as usual)
and the other bytes received for it (*extra* variants, held in RAM), and once every chunk
number has at least one variant, :func:`find_verified` looks for the contiguous choice of
variants whose sha512 is the file hash. Agreeing duplicates are recognised by their
``(offset, size, chunk_hash)`` and cost nothing.

The bounds (constants below, documented in docs/architecture.md):

* :data:`MAX_CHUNKINGS` chunkings per file generation (each its own staging file in disk
  mode);
* :data:`MAX_EXTRA_VARIANTS` extra variants per chunking, and :data:`MAX_EXTRA_BYTES`
  bytes of them per chunking, :data:`MAX_EXTRA_BYTES_TOTAL` over all files (RAM);
* :data:`MAX_PATHS` choices hashed per completion check: the search walks the chunk
  numbers in order, branching only where two variants both start where the bytes so far
  end, and shares the hash of a common prefix between branches (``hashlib`` copies).

A chunk beyond a bound is refused alone (its message is recorded as rejected); the file
goes on with the variants it holds. A file none of whose choices verified is rejected
(its messages are read again by the next run) and *parked*: :data:`MAX_PARKED` such
files are kept, holding no commit, so that a later chunk of the same generation adds a
variant to them and may complete the file at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Variant", "Found", "Search", "find_verified", "MAX_CHUNKINGS", "MAX_EXTRA_VARIANTS",
           "MAX_EXTRA_BYTES", "MAX_EXTRA_BYTES_TOTAL", "MAX_PATHS", "MAX_PARKED",
           "MAX_PARKED_RAM"]

#: Chunkings (distinct ``n_total_chunks``) kept per file generation.
MAX_CHUNKINGS = 4
#: Extra variants (other bytes for a chunk number already held) kept per chunking.
MAX_EXTRA_VARIANTS = 64
#: Bytes of extra variants kept per chunking, and over every file being rebuilt.
MAX_EXTRA_BYTES = 32 << 20
MAX_EXTRA_BYTES_TOTAL = 256 << 20
#: Choices of variants hashed (search paths begun) per completion check.
MAX_PATHS = 64
#: Files none of whose copies verified, kept (not holding any commit) so that a chunk
#: arriving later -- the genuine one of a number a failed copy filled, say from another
#: partition -- can still complete the file with the chunks held: at most this many
#: files, and this many bytes of RAM among them (oldest forgotten first).
MAX_PARKED = 32
MAX_PARKED_RAM = 64 << 20


@dataclass(frozen=True, slots=True)
class Variant:
    """One set of bytes for one chunk number: where it goes, its size, its chunk hash,
    and its bytes (None: a primary variant on disk, read back by the caller's feeder)."""

    chunk_i: int
    offset: int
    size: int
    chunk_hash: bytes
    data: bytes | memoryview | None = None

    @property
    def signature(self) -> tuple[int, int, bytes]:
        """What makes two copies of a chunk the same chunk."""
        return self.offset, self.size, self.chunk_hash


@dataclass(frozen=True, slots=True)
class Search:
    """What :func:`find_verified` did: the verified choice (None: none found), how many
    whole choices it hashed, and whether it tried every choice held (False: it stopped
    at ``max_paths``)."""

    found: Found | None
    hashed: int
    exhausted: bool


@dataclass(frozen=True, slots=True)
class Found:
    """The verified choice: one variant per chunk number, in order, and the file's size
    and sha256 (Girder's checksum)."""

    variants: tuple[Variant, ...]
    size: int
    sha256: str


#: ``feed(variant, update)`` passes the variant's bytes, in order, to ``update``.
Feeder = Callable[[Variant, Callable[[bytes | memoryview], None]], None]


def find_verified(n_total: int, options: Callable[[int], list[Variant]], feed: Feeder,
                  file_hash: bytes, max_paths: int = MAX_PATHS) -> Search:
    """Look for the contiguous choice of one variant per chunk number ``1..n_total``
    (offsets follow each other from 0) whose sha512 is ``file_hash``, within
    ``max_paths`` search paths. ``options(i)`` lists chunk ``i``'s variants, the
    preferred first (the primary): the first path tried is the primary choice. No
    whole choice at all (``hashed == 0`` and exhausted) means the file still misses
    bytes: a hole no variant fills."""
    stack: list[tuple[int, int, object, object, list[Variant], Variant | None]] = [
        (1, 0, hashlib.sha512(), hashlib.sha256(), [], None)]
    paths = hashed = 0
    while stack and paths < max_paths:
        i, end, h512, h256, chosen, pick = stack.pop()
        paths += 1

        def update(block, h512=h512, h256=h256) -> None:
            h512.update(block)
            h256.update(block)

        while i <= n_total:
            if pick is not None:
                variant, pick = pick, None
            else:
                fits = [v for v in options(i) if v.offset == end]
                if not fits:
                    break  # no variant starts where the bytes so far end: a dead path
                for other in reversed(fits[1:]):
                    stack.append((i, end, h512.copy(), h256.copy(), list(chosen), other))
                variant = fits[0]
            feed(variant, update)
            chosen.append(variant)
            end += variant.size
            i += 1
        else:
            hashed += 1
            if h512.digest() == file_hash:
                return Search(Found(tuple(chosen), end, h256.hexdigest()), hashed, True)
    return Search(None, hashed, not stack)
