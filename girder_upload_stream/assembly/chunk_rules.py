"""Whether a chunk can belong to a file the consumer may rebuild, each check O(1)-ish.

Used by :mod:`girder_upload_stream.assembly.reassembly` on every chunk, before anything is stored:

* :func:`size_problem`: the file would exceed the size limit (``--max_file_size_mb``);
* :func:`reserved_problem`: the file's path reaches a folder the consumer keeps its own
  files in (the staging folder, the registry and log folder);
* :func:`placement_problem`: the chunk cannot fit with the chunks of its file present.

Each returns the reason as text, or None. None of them costs more than a few
operations on integers and the chunk's nearest neighbours, whatever ``n_total_chunks``
a message claims.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from girder_upload_stream.assembly.safe_disk import STAGING_DIR
from girder_upload_stream.wire.codec import Chunk

__all__ = ["size_problem", "reserved_paths", "reserved_problem", "placement_problem",
           "staging_name", "Placed"]


def size_problem(chunk: Chunk, limit: int) -> str | None:
    """Why ``chunk`` cannot belong to a file of at most ``limit`` bytes, or None.

    Every chunk holds at least one byte, so the file has at least ``n_total_chunks``
    bytes, and at least ``offset + size + (n_total - i)``: this chunk and one byte for
    each chunk after it. The same bound makes negative or out-of-range numbers (only
    possible when the codec is bypassed) impossible placements.
    """
    i, n_total, offset = chunk.chunk_i, chunk.n_total_chunks, chunk.chunk_offset
    if n_total < 1 or not 1 <= i <= n_total or offset < i - 1:
        return f"impossible placement: chunk {i} of {n_total} at offset {offset}"
    if n_total > limit:
        return (f"file too large: {n_total} chunks exceed the {limit}-byte limit "
                f"(--max_file_size_mb)")
    end = offset + chunk.size
    if end + (n_total - i) > limit:
        more = f" and {n_total - i} more chunk(s) follow" if n_total > i else ""
        return (f"file too large: chunk {i} ends at byte {end}{more}, over the "
                f"{limit}-byte limit (--max_file_size_mb)")
    return None


def reserved_paths(output_dir: Path, folders: Iterable[Path]) -> frozenset[str]:
    """The POSIX paths, relative to ``output_dir``, of the staging folder and of each of
    ``folders`` that lies strictly inside ``output_dir`` (as given and as resolved, so a
    symlinked or relative spelling is caught too). A folder equal to ``output_dir`` or
    outside it adds nothing."""
    reserved = {STAGING_DIR}
    roots = {Path(os.path.normpath(output_dir.absolute())), output_dir.resolve()}
    for folder in folders:
        for spelling in {Path(os.path.normpath(folder.absolute())), folder.resolve()}:
            for root in roots:
                try:
                    parts = spelling.relative_to(root).parts
                except ValueError:
                    continue
                if parts:
                    reserved.add("/".join(parts))
    return frozenset(reserved)


def reserved_problem(rel_path: str, reserved: Iterable[tuple[str, ...]]) -> str | None:
    """Why ``rel_path`` may not be rebuilt: it equals, lies below, or is a folder above
    a reserved path (a file there would write into, or stand in the way of, the
    consumer's own files). ``reserved`` holds each reserved path split on ``/``."""
    parts = tuple(rel_path.split("/"))
    for folder in reserved:
        n = min(len(parts), len(folder))
        if parts[:n] == folder[:n]:
            where = "/".join(folder)
            return (f"reserved path: {rel_path!r} reaches {where!r}, where the consumer "
                    f"keeps its own files")
    return None


def staging_name(rel_path: str, file_hash: bytes, serial: int) -> str:
    """The staging file of one assembly: a hash of the generation ``(rel_path,
    file_hash)`` (never message text, so no message can name, or collide with, another
    file's staging file) and a serial unique in the run (a generation assembled again,
    e.g. produced again after it was uploaded, never reopens a file still being read)."""
    digest = hashlib.sha256(rel_path.encode("utf-8", "surrogatepass") + b"\0" + file_hash)
    return f"{digest.hexdigest()[:40]}-{serial}.partial"


class Placed(Protocol):
    """What :func:`placement_problem` reads of a file being assembled."""

    n_total: int
    total: int | None  # the file's size, once its last chunk is present
    order: list[int]  # sorted chunk numbers present
    pieces: dict[int, tuple[int, int, bytes]]  # chunk number -> (offset, size, hash)


def placement_problem(state: Placed, i: int, offset: int, size: int) -> str | None:
    """Say why chunk ``i`` at ``[offset, offset+size)`` cannot fit with the chunks present
    (only its nearest neighbours are looked at: O(log k) for k chunks present)."""
    end = offset + size
    if state.total is not None and end > state.total:
        return f"chunk {i} ends at byte {end}, past the end of the file ({state.total} bytes)"
    if i == state.n_total and state.order and state.order[-1] < i:
        last_i = state.order[-1]
        if state.pieces[last_i][0] + state.pieces[last_i][1] > end:
            return f"chunk {last_i} extends past the end of the file ({end} bytes)"
    pos = bisect.bisect_left(state.order, i)
    if pos > 0:
        prev_i = state.order[pos - 1]
        prev_off, prev_size, _ = state.pieces[prev_i]
        room = offset - (prev_off + prev_size)
        if room < i - prev_i - 1:
            return f"chunk {i} at offset {offset} overlaps chunk {prev_i}"
        if prev_i == i - 1 and room > 0:
            return f"hole of {room} bytes between chunks {prev_i} and {i}"
    if pos < len(state.order):
        next_i = state.order[pos]
        room = state.pieces[next_i][0] - end
        if room < next_i - i - 1:
            return f"chunk {i} at offset {offset} overlaps chunk {next_i}"
        if next_i == i + 1 and room > 0:
            return f"hole of {room} bytes between chunks {i} and {next_i}"
    return None
