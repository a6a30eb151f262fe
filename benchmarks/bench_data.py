"""Deterministic test data, and producing it to a topic with our producer.

Every file's bytes come from ``random.Random(seed)`` with a seed derived from the
dataset's seed and the file's index, so a re-run of the benchmark uploads the same
bytes. Data is written below a temporary folder the caller deletes afterwards.
Producing is never timed: it runs to completion before any consumer starts.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_common import KIB, MIB, OUR_CLI, BenchError, Stack

__all__ = ["CHUNK_SIZE", "Dataset", "write_random", "tree_of", "small_tree", "big_files", "mixed_tree",
           "produce"]

#: The producer's default chunk size (OpenMSIStream's as well).
CHUNK_SIZE = 524_288
_BLOCK = 8 * MIB


@dataclass
class Dataset:
    """Files below ``root``: ``{relative POSIX path: size}``, produced in chunks of
    ``chunk_size`` bytes (:func:`produce`)."""

    root: Path
    files: dict[str, int] = field(default_factory=dict)
    chunk_size: int = CHUNK_SIZE

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def n_files(self) -> int:
        return len(self.files)

    def chunks(self, chunk_size: int | None = None) -> int:
        size_of_chunk = chunk_size or self.chunk_size
        return sum(-(-size // size_of_chunk) for size in self.files.values())

    def describe(self) -> str:
        total = self.total_bytes
        size = f"{total / MIB:,.1f} MiB" if total >= MIB else f"{total / KIB:,.0f} KiB"
        return f"{self.n_files:,} file(s), {size}, {self.chunks():,} chunk message(s)"


def write_random(path: Path, size: int, seed: int) -> None:
    """``size`` pseudo-random bytes from ``seed``, written in 8 MiB blocks (no big buffer)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left > 0:
            n = min(_BLOCK, left)
            out.write(rng.randbytes(n))
            left -= n


def tree_of(root: Path, n_files: int, size: int, seed: int,
            rel_of: Callable[[int], str]) -> Dataset:
    """``n_files`` random files of ``size`` bytes, the ``i``-th at ``rel_of(i)``."""
    data = Dataset(root)
    for i in range(n_files):
        rel = rel_of(i)
        write_random(root / rel, size, seed * 1_000_003 + i)
        data.files[rel] = size
    return data


def small_tree(root: Path, n_files: int, size: int, seed: int = 1) -> Dataset:
    """``n_files`` files of ``size`` bytes in a 3-level tree of 2 x 5 x 10 folders, so
    1,000 files put 10 in each of the 100 leaf folders (as ``flow_bench.py``)."""
    def rel_of(i: int) -> str:
        leaf = i % 100
        return f"l1-{leaf // 50}/l2-{(leaf // 10) % 5}/l3-{leaf % 10}/f{i:05d}.bin"
    return tree_of(root, n_files, size, seed, rel_of)


def big_files(root: Path, n_files: int, size: int, seed: int = 2) -> Dataset:
    """``n_files`` files of ``size`` bytes at the root (``big-00.bin`` ...)."""
    data = Dataset(root)
    for i in range(n_files):
        rel = f"big-{i:02d}.bin"
        write_random(root / rel, size, seed * 1_000_003 + i)
        data.files[rel] = size
    return data


def mixed_tree(root: Path, total: int, max_file: int, seed: int = 4) -> Dataset:
    """About ``total`` bytes of mixed sizes in two levels of folders: half the files
    small (16 KiB-512 KiB), a third medium (512 KiB-8 MiB), the rest large (8 MiB up to
    ``max_file``); sizes are capped at ``max_file``. The order of files is shuffled so
    that large and small files interleave on the topic."""
    rng = random.Random(seed)
    data = Dataset(root)
    made, i = 0, 0
    while made < total:
        kind = rng.random()
        if kind < 0.5:
            size = rng.randint(16 * KIB, 512 * KIB)
        elif kind < 0.83:
            size = rng.randint(512 * KIB, 8 * MIB)
        else:
            size = rng.randint(8 * MIB, max(8 * MIB, max_file))
        size = min(size, max_file, total - made) or 1
        rel = f"run-{i % 4}/set-{(i // 4) % 3}/m{i:04d}.dat"
        write_random(root / rel, size, seed * 1_000_003 + i)
        data.files[rel] = size
        made += size
        i += 1
    return data


def produce(stack: Stack, data: Dataset | Path, topic: str, log: Path,
            timeout: float = 3600) -> str:
    """``girder-upload-stream produce ROOT --config local --topic_name T --quiet``
    (and ``--chunk_size`` when the dataset's is not the default), run to completion;
    returns its summary line."""
    root = data.root if isinstance(data, Dataset) else data
    argv = [str(OUR_CLI), "produce", str(root), "--config", "local", "--topic_name", topic,
            "--quiet"]
    if isinstance(data, Dataset) and data.chunk_size != CHUNK_SIZE:
        argv += ["--chunk_size", str(data.chunk_size)]
    with open(log, "ab") as out:
        proc = subprocess.run(argv, env=stack.env(), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise BenchError(f"producing {root} to {topic} failed (exit {proc.returncode}): "
                         f"{text[-5:]}")
    return next((line for line in reversed(text) if line.startswith("produced")), "")
