"""Throughput and memory benchmark of the chunk decoder and the Reassembler, on one core.

Run:  python benchmarks/reassembly_bench.py [--total-mib 256] [--big-mib 1024]

Each scenario runs in its own child process so that its peak RSS (getrusage ru_maxrss)
is its own. Chunk data come from deterministic per-chunk PRNG seeds, so any chunk can be
regenerated in any order without holding the file:

* ``throughput``: ``--total-mib`` of data as 8 files of 512 KiB chunks, pre-encoded as
  Kafka message values, fed in order and shuffled (interleaving the files). Reports MB/s
  of ``Reassembler.add`` alone and of ``decode_chunk`` + ``add`` (the consumer's cost).
* ``bigfile``: one ``--big-mib`` file in disk mode, chunks generated on the fly, fed in
  order and in a shuffled order; reports MB/s and the peak RSS of the whole process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from girder_upload_stream.codec import Chunk, decode_chunk, encode_chunk  # noqa: E402
from girder_upload_stream.reassembly import AddStatus, Reassembler  # noqa: E402

CHUNK = 524_288
MIB = 1 << 20


def chunk_data(file_seed: int, i: int, size: int) -> bytes:
    """Bytes of chunk ``i`` (1-based) of a file: reproducible in any order."""
    return random.Random(file_seed * 1_000_003 + i).randbytes(size)


def file_chunks(file_seed: int, size: int, order: list[int] | None = None,
                name: str = "bench.bin") -> Iterator[Chunk]:
    """Yield a file's chunks (hashes computed in a first, streaming pass)."""
    n_total = -(-size // CHUNK)
    sizes = [min(CHUNK, size - (i - 1) * CHUNK) for i in range(1, n_total + 1)]
    file_hasher = hashlib.sha512()
    for i in range(1, n_total + 1):
        file_hasher.update(chunk_data(file_seed, i, sizes[i - 1]))
    file_hash = file_hasher.digest()
    for i in order or range(1, n_total + 1):
        data = chunk_data(file_seed, i, sizes[i - 1])
        yield Chunk(name, file_hash, hashlib.sha512(data).digest(), (i - 1) * CHUNK, i,
                    n_total, "bench", "", data)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_throughput(mode: str, total_mib: int, shuffled: bool) -> dict:
    n_files, file_size = 8, total_mib * MIB // 8
    chunks = [c for f in range(n_files)
              for c in file_chunks(f, file_size, name=f"file{f}.bin")]
    if shuffled:
        random.Random(1).shuffle(chunks)
    messages = [encode_chunk(c)[1] for c in chunks]
    results = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for label, items, decode in (("add", chunks, False), ("decode+add", messages, True)):
            reassembler = Reassembler(mode, Path(tmp) / label, None)
            completed = 0
            start = time.perf_counter()
            for item in items:
                result = reassembler.add(decode_chunk(item) if decode else item)
                completed += result.status is AddStatus.COMPLETED
            elapsed = time.perf_counter() - start
            assert completed == n_files, completed
            results[label] = round(total_mib * MIB / elapsed / 1e6, 1)
    return {"scenario": f"{mode} {total_mib} MiB {'shuffled' if shuffled else 'in order'}",
            "MB/s": results, "peak_rss_MiB": round(peak_rss_mib())}


def run_bigfile(big_mib: int, shuffled: bool) -> dict:
    size = big_mib * MIB
    order = list(range(1, -(-size // CHUNK) + 1))
    if shuffled:
        random.Random(2).shuffle(order)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        reassembler = Reassembler("disk", Path(tmp), None)
        busy = 0.0
        done = None
        for chunk in file_chunks(99, size, order):
            start = time.perf_counter()
            result = reassembler.add(chunk)
            busy += time.perf_counter() - start
            done = result.completed or done
        assert done is not None and done.size == size
    how = "shuffled" if shuffled else "in order"
    return {"scenario": f"disk {big_mib} MiB single file {how}",
            "MB/s": {"add": round(size / busy / 1e6, 1)}, "peak_rss_MiB": round(peak_rss_mib())}


def child(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "throughput":
        report = run_throughput(rest[0], int(rest[1]), rest[2] == "1")
    else:
        report = run_bigfile(int(rest[0]), rest[1] == "1")
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    runs = [["throughput", mode, str(args.total_mib), shuffled]
            for mode in ("memory", "disk", "both") for shuffled in ("0", "1")]
    runs += [["bigfile", str(args.big_mib), shuffled] for shuffled in ("0", "1")]
    hashes = {name: hashlib.new(name) for name in ("sha512", "sha256")}
    probe = bytes(64 * MIB)
    for name, hasher in hashes.items():
        start = time.perf_counter()
        hasher.update(probe)
        rate = 64 * MIB / (time.perf_counter() - start) / 1e6
        print(f"reference: hashlib {name} {rate:.0f} MB/s")
    for run in runs:
        out = subprocess.run([sys.executable, __file__, "--child", *run], check=True,
                             capture_output=True, text=True).stdout
        report = json.loads(out)
        speeds = ", ".join(f"{k} {v} MB/s" for k, v in report["MB/s"].items())
        print(f"{report['scenario']:<40} {speeds:<40} peak RSS {report['peak_rss_MiB']} MiB")


if __name__ == "__main__":
    main()
