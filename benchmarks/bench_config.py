"""The sizes of every scenario (full, as in issue 6, or ``--quick``), and the context
passed to each scenario: the stack, a Girder client, the scratch folder, the options.

The full sizes are the issue's; ``--quick`` shrinks every scenario to a smoke test of
the harness (one repetition, a few MiB) whose numbers say little about performance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.bench_common import KIB, MIB, Stack, new_name
from benchmarks.bench_data import Dataset, produce
from benchmarks.bench_girder import create_topic, delete_topics

__all__ = ["Sizes", "FULL", "QUICK", "Context"]


@dataclass(frozen=True)
class Sizes:
    """Every knob of every scenario."""

    reps: int = 3
    n_threads: int = 2
    # 1: many small files in a 3-level tree
    small_files: int = 1000
    small_size: int = 64 * KIB
    # 2: a few big files, memory and disk mode
    big_files: int = 8
    big_size: int = 256 * MIB
    # 3: one huge file, disk mode
    huge_size: int = 2048 * MIB
    # 4: restart cost on a mixed topic
    restart_total: int = 500 * MIB
    restart_max_file: int = 64 * MIB
    restart_kill_fraction: float = 0.5
    restart_stall_seconds: float = 300.0  # no growth for this long after a restart: give up
    # 5: scale-out on an 8-partition topic
    scale_files: int = 800
    scale_size: int = 128 * KIB
    scale_partitions: int = 8
    # 6: soak
    soak_minutes: float = 30.0
    soak_sample_seconds: float = 60.0
    soak_files_per_second: float = 2.0
    soak_file_size: int = 256 * KIB
    soak_batch_seconds: float = 5.0
    soak_baseline: bool = True
    # 7: a remote Girder (a delay added to every request)
    remote_files: int = 200
    remote_size: int = 64 * KIB
    remote_delay_ms: float = 20.0
    remote_partitions: int = 8
    # 7: the same with a slow Girder (ours and OpenMSIStream, --n_threads 2)
    remote_slow_delay_ms: float = 200.0
    remote_slow_files: int = 60
    # 10: scale-out with files of several chunks (issue 23): 1, 2, 4 processes, re-keyed
    files_scale_files: int = 120
    files_scale_partitions: int = 4
    files_scale_delay_ms: float = 20.0
    files_scale_chunk_kib: int = 512
    # 11: the same, latency-bound: small chunks, Girder far away, more files
    latency_scale_files: int = 480
    latency_scale_chunk_kib: int = 16
    latency_scale_delay_ms: float = 200.0
    # topics
    partitions: int = 4
    big_partitions: int = 8  # 2 GiB over 8 partitions stays below the 512 MiB retention


FULL = Sizes()
QUICK = Sizes(reps=1, small_files=40, big_files=8, big_size=2 * MIB, huge_size=24 * MIB,
              restart_total=24 * MIB, restart_max_file=4 * MIB, restart_stall_seconds=150.0,
              scale_files=48, soak_minutes=1.0, soak_sample_seconds=15.0,
              soak_file_size=64 * KIB, remote_files=40,
              remote_slow_files=16, files_scale_files=24,
              latency_scale_files=40)


@dataclass
class Context:
    """What every scenario gets."""

    stack: Stack
    gc: object
    work: Path
    sizes: Sizes
    argv: list[str]
    keep: bool = False
    topics: list[str] = field(default_factory=list)

    def with_sizes(self, **changes) -> Context:
        return replace(self, sizes=replace(self.sizes, **changes))

    def log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def timeout_for(self, n_bytes: int) -> float:
        """A generous bound on one run: 3 minutes plus 1 MB/s."""
        return 180 + n_bytes / 1e6

    def topic_with(self, prefix: str, data: Dataset | Path, partitions: int | None = None) -> str:
        """A fresh topic holding ``data`` (produced now, not timed)."""
        topic = new_name(prefix)
        create_topic(self.stack, topic, partitions or self.sizes.partitions)
        self.topics.append(topic)
        line = produce(self.stack, data, topic, self.work / "produce.log")
        self.log(f"topic {topic}: {line}")
        return topic

    def drop_topic(self, topic: str) -> None:
        if not self.keep:
            delete_topics(self.stack, [topic])
            self.topics.remove(topic)

    def repetitions(self) -> Iterator[int]:
        for rep in range(self.sizes.reps):
            self.log(f"repetition {rep + 1}/{self.sizes.reps}")
            yield rep
