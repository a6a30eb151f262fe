"""How ``--memory_budget_mb`` is shared out: librdkafka's prefetch, the poll batch,
the upload and stream blocks, and what is left for the bytes of files.

Measured (docs/architecture.md, "Back-pressure and the memory budget"): with the budget
bounding only the file bytes, librdkafka's prefetch (64 MiB queue plus a fetch of up to
16 MiB per partition in flight), the poll batch, girder-client's 16 MiB request blocks
and the streams' 8 MiB blocks came on top of it, and glibc kept freed 512 KiB chunks in
its heap. :func:`plan_memory` (pure) sizes librdkafka's consumer from the budget and
gives the files what the rest leaves; :func:`tune_malloc` makes freed big buffers go
back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

__all__ = ["MemoryPlan", "plan_memory", "tune_malloc", "MALLOC_MMAP_THRESHOLD"]

logger = logging.getLogger(__name__)

MIB = 1 << 20
#: girder-client's request block (``UPLOAD_BLOCK_BYTES`` in girder/store.py), one per
#: upload worker, and a streamed upload's block (``STREAM_BLOCK``, girder/streaming.py),
#: at most ``SEND_SLOTS`` (girder/streaming.py) being sent at once over every stream. Repeated here, not
#: imported, so that this module stays free of Girder's imports; a unit test checks
#: they agree.
UPLOAD_BLOCK = 16 * MIB
STREAM_BLOCK = 8 * MIB
SEND_SLOTS = 2
#: Allocations from this size up get their own mapping, unmapped when freed: above a
#: stream block (8 MiB), so that 512 KiB chunks and stream blocks are reused from the
#: heap instead of costing a fresh, zero-filled mapping per copy (docs/architecture.md,
#: "The allocator": 1.7 system CPU-seconds per GiB at 128 KiB), and fixed, so that glibc
#: does not raise it to the largest block freed (up to 32 MiB).
MALLOC_MMAP_THRESHOLD = 9 * 1024 * 1024


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


@dataclass(frozen=True)
class MemoryPlan:
    """The shares of one budget, in bytes. ``files_bytes`` is what spilling and
    pausing hold the file bytes in RAM to (the rest is outside the files' reach)."""

    budget_bytes: int
    queue_bytes: int  # librdkafka's queued.max.messages.kbytes (times 1024)
    fetch_partition_bytes: int  # fetch.message.max.bytes: per partition and fetch
    poll_bytes: int  # one poll batch, held until handled
    upload_bytes: int  # girder-client's request blocks, one per upload worker
    stream_bytes: int  # blocks being sent by streamed uploads
    files_bytes: int

    @property
    def prefetch_bytes(self) -> int:
        """librdkafka stops fetching once its queue holds ``queue_bytes``, and a
        fetch (``fetch.max.bytes``, which librdkafka caps to the queue) may then still
        arrive: twice the queue."""
        return 2 * self.queue_bytes

    def consumer_defaults(self) -> dict[str, str]:
        """librdkafka settings to ``setdefault`` (a config file's values win)."""
        return {"queued.max.messages.kbytes": str(self.queue_bytes // 1024),
                "fetch.message.max.bytes": str(self.fetch_partition_bytes)}


def plan_memory(budget_bytes: int, n_threads: int, streaming: bool = True) -> MemoryPlan:
    """Share ``budget_bytes`` out: librdkafka's queue a 16th (4-64 MiB; 64 MiB is its
    default), a partition's fetch an eighth of the queue (1-8 MiB), the poll batch a
    16th (1-32 MiB), the upload blocks and (with ``streaming``) the stream blocks what
    they are; the files get the rest, at least a quarter of the budget (a budget too
    small for the fixed blocks is exceeded by them, not starved).

    Why an eighth of the queue: librdkafka caps a fetch response at the queue's size,
    so with a partition's share at a quarter of it (a 64th of the budget), one
    response held the full shares of four partitions only. The partitions drifted
    apart, and with them the files whose chunks they carry (a producer keys chunks by
    number, spreading each file over every partition): 8 files of 128 MiB on 8
    partitions had all 8 files in progress at once and spilled 517 of their 1,024
    MiB over a 256 MiB budget; with an eighth, one at a time and 130 MiB (scenario 9 of
    docs/benchmarks.md)."""
    queue = _clamp(budget_bytes // 16, 4 * MIB, 64 * MIB)
    partition = _clamp(queue // 8, 1 * MIB, 8 * MIB)
    poll = _clamp(budget_bytes // 16, 1 * MIB, 32 * MIB)
    upload = max(1, n_threads) * UPLOAD_BLOCK
    stream = SEND_SLOTS * STREAM_BLOCK if streaming else 0
    rest = budget_bytes - 2 * queue - poll - upload - stream
    return MemoryPlan(budget_bytes, queue, partition, poll, upload, stream,
                      files_bytes=max(budget_bytes // 4, rest))


def tune_malloc(libc_name: str | None = None) -> bool:
    """Make glibc map every allocation of ``MALLOC_MMAP_THRESHOLD`` or more on its own
    and unmap it when freed (a fixed threshold: glibc otherwise raises it up to 32 MiB
    once big blocks are freed, and then keeps freed request blocks in its heap); smaller
    ones (chunks, stream blocks) are reused from the heap. Limit malloc to 2 arenas. True if glibc took it; elsewhere (musl, macOS) nothing."""
    name = libc_name or ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # glibc's malloc.h
    done = bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD))
    done = bool(mallopt(m_arena_max, 2)) and done
    if not done:
        logger.debug("mallopt refused the memory settings; glibc's defaults stay")
    return done
