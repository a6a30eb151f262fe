"""Throughput and memory benchmark of the chunk decoder and the Reassembler, on one core.

Run:  python benchmarks/reassembly_bench.py [--total-mib 256] [--big-mib 1024]

Each scenario runs in its own child process so that its peak RSS (getrusage ru_maxrss)
is its own. Chunk data come from deterministic per-chunk PRNG seeds, so any chunk can be
regenerated in any order without holding the file:

* ``throughput``: ``--total-mib`` of data as 8 files of 512 KiB chunks, pre-encoded as
  Kafka message values, fed in three orders: in order; as a consumer of 8 partitions sees
  them (each chunk on a partition picked by its key's hash, partitions read in turn in
  fetches of 32 messages); and fully shuffled. Reports MB/s of ``Reassembler.add`` alone
  and of ``decode_chunk`` + ``add`` (the consumer's cost).
* ``bigfile``: one ``--big-mib`` file in disk mode, chunks generated on the fly, fed in
  the same orders; reports the wall-clock MB/s of generating and adding (the file hashes
  run on a helper thread, partly while chunks are generated), the MB/s of generating
  alone, and the peak RSS of the whole process.
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

from girder_upload_stream.wire.codec import Chunk, decode_chunk, encode_chunk  # noqa: E402
from girder_upload_stream.assembly.reassembly import AddStatus, Reassembler  # noqa: E402

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


ORDERS = ("in order", "8 partitions", "shuffled")


def arrival_order(items: list, order: str, seed: int) -> list:
    """``items`` in the order a consumer receives them (see the module docstring)."""
    if order == "in order":
        return list(items)
    if order == "shuffled":
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    rng = random.Random(seed)
    partitions: list[list] = [[] for _ in range(8)]
    for item in items:
        partitions[rng.randrange(8)].append(item)
    arrived = []
    while any(partitions):
        for part in partitions:
            arrived += part[:32]
            del part[:32]
    return arrived


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_throughput(mode: str, total_mib: int, order: str) -> dict:
    n_files, file_size = 8, total_mib * MIB // 8
    chunks = arrival_order([c for f in range(n_files)
                            for c in file_chunks(f, file_size, name=f"file{f}.bin")], order, 1)
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
    return {"scenario": f"{mode} {total_mib} MiB {order}",
            "MB/s": results, "peak_rss_MiB": round(peak_rss_mib())}


def run_bigfile(big_mib: int, order: str) -> dict:
    size = big_mib * MIB
    indices = arrival_order(list(range(1, -(-size // CHUNK) + 1)), order, 2)
    start = time.perf_counter()
    for _ in file_chunks(99, size, indices):
        pass
    generate = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        reassembler = Reassembler("disk", Path(tmp), None)
        done = None
        start = time.perf_counter()
        for chunk in file_chunks(99, size, indices):
            done = reassembler.add(chunk).completed or done
        wall = time.perf_counter() - start
        assert done is not None and done.size == size
    return {"scenario": f"disk {big_mib} MiB single file {order}",
            "MB/s": {"generate+add": round(size / wall / 1e6, 1),
                     "generate": round(size / generate / 1e6, 1)},
            "peak_rss_MiB": round(peak_rss_mib())}


def child(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "throughput":
        report = run_throughput(rest[0], int(rest[1]), rest[2])
    else:
        report = run_bigfile(int(rest[0]), rest[1])
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
    runs = [["throughput", mode, str(args.total_mib), order]
            for mode in ("memory", "disk", "both") for order in ORDERS]
    runs += [["bigfile", str(args.big_mib), order] for order in ORDERS]
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
        print(f"{report['scenario']:<42} {speeds:<48} peak RSS {report['peak_rss_MiB']} MiB")


if __name__ == "__main__":
    main()
