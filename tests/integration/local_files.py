"""Local files: trees of test files, the registries, the output folder."""

from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path

__all__ = ["CHUNK_SIZE", "sha256", "n_chunks", "write_tree", "processed_rel_paths",
           "log_uniform_files", "in_progress_rows", "tree_snapshot"]


CHUNK_SIZE = 65_536


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def n_chunks(data: bytes, chunk_size: int = CHUNK_SIZE) -> int:
    return -(-len(data) // chunk_size)


def write_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write ``{relative POSIX path: bytes}`` below ``root``; returns ``files``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def processed_rel_paths(logs_dir: Path, topic: str, group: str) -> list[str]:
    """Relative paths in the processed registry of ``topic``/``group`` (all parts)."""
    from girder_upload_stream.registry.tables import read_processed
    return [row.rel_filepath.as_posix() for row in read_processed(logs_dir, topic, group).rows]


def log_uniform_files(n: int | None, seed: int, min_size: int, max_size: int,
                      folders: tuple[str, ...] = ("", "run1", "run1/sample A",
                                                  "run1/sample A/raw", "run2/ü/deep/er"),
                      total_bytes: int | None = None) -> dict[str, bytes]:
    """``n`` files of random bytes (or as many as make ``total_bytes``, the last one
    trimmed), sizes log-uniform in [min_size, max_size], spread over ``folders``
    (``""`` is the root); deterministic for a seed."""
    assert n is not None or total_bytes is not None
    rng = random.Random(seed)
    log_min, log_max = math.log(min_size), math.log(max_size)
    files: dict[str, bytes] = {}
    total = 0
    index = 0
    while (n is None or index < n) and (total_bytes is None or total < total_bytes):
        size = int(round(math.exp(rng.uniform(log_min, log_max))))
        if total_bytes is not None:
            size = min(size, total_bytes - total)
        folder = folders[index % len(folders)]
        name = f"f{index:04d}.bin"
        files[f"{folder}/{name}" if folder else name] = rng.randbytes(size)
        total += size
        index += 1
    return files


def in_progress_rows(logs_dir: Path, topic: str, group: str) -> list:
    """The rows of the in-progress registry of ``topic``/``group``, as saved on disk."""
    from girder_upload_stream.registry.tables import InProgressTable
    return InProgressTable.open(logs_dir, topic, group).rows()


def tree_snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns, sha256 or link target)}`` of everything
    below ``root`` (symlinks not followed), leaving out ``skip`` and what is below it."""
    snapshot: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if skip is not None and path == skip:
                continue
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                snapshot[rel] = ("link", 0, st.st_mtime_ns, os.readlink(path))
            elif path.is_dir():
                snapshot[rel] = ("dir", 0, st.st_mtime_ns, "")
            else:
                snapshot[rel] = ("file", st.st_size, st.st_mtime_ns,
                                 sha256(path.read_bytes()))
    return snapshot
