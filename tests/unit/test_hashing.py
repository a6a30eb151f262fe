"""Unit tests for girder_upload_stream.assembly.hashing (the file-hash helper thread)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from girder_upload_stream.assembly.hashing import INLINE_BYTES, HashPipe


def blocks(seed: int, n: int) -> list[bytes]:
    """Blocks of mixed sizes: some hashed inline, some queued to the worker."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([10, 3000, INLINE_BYTES + 1, 300_000])) for _ in range(n)]


def test_interleaved_files_get_the_digests_of_their_bytes_in_order():
    pipe = HashPipe(max_pending_bytes=1 << 20)
    files = {f: blocks(f, 12) for f in range(5)}
    digests = {f: pipe.digest() for f in files}
    for i in range(12):
        for f, parts in files.items():
            digests[f].update(parts[i])
    for f, parts in files.items():
        joined = b"".join(parts)
        assert digests[f].sha512() == hashlib.sha512(joined).digest()
        assert digests[f].sha256_hex() == hashlib.sha256(joined).hexdigest()
        assert digests[f].hashed_bytes == len(joined)


def test_jobs_feed_the_worker_in_order_with_blocks():
    pipe = HashPipe()
    digest = pipe.digest()
    first, later, last = os.urandom(500_000), os.urandom(70_000), os.urandom(400_000)
    digest.update(first)
    digest.update_later(lambda feed: (feed(memoryview(later)[:1]), feed(memoryview(later)[1:])),
                        len(later))
    digest.update(last, now=True)
    assert digest.sha512() == hashlib.sha512(first + later + last).digest()
    assert digest.hashed_bytes == len(first + later + last)


def test_a_failing_job_is_raised_by_wait_and_later_files_are_unharmed():
    pipe = HashPipe()
    broken, fine = pipe.digest(), pipe.digest()

    def fail(feed):
        raise OSError(5, "I/O error")

    broken.update_later(fail, 10)
    fine.update(b"x" * 300_000)
    with pytest.raises(OSError, match="I/O error"):
        broken.sha512()
    assert fine.sha512() == hashlib.sha512(b"x" * 300_000).digest()


def test_queued_bytes_are_bounded_and_a_full_queue_makes_the_caller_wait():
    pipe = HashPipe(max_pending_bytes=600_000)
    digest = pipe.digest()
    gate, fed = threading.Event(), []
    digest.update_later(lambda feed: (gate.wait(5), feed(b"")), 0)  # holds the worker
    digest.update(b"a" * 300_000)
    digest.update(b"b" * 300_000)
    assert pipe.pending_bytes == 600_000
    third = threading.Thread(target=lambda: (digest.update(b"c" * 300_000), fed.append(1)))
    third.start()
    time.sleep(0.2)
    assert fed == [] and pipe.pending_bytes == 600_000  # still waiting for room
    gate.set()
    third.join(5)
    assert fed == [1]
    assert digest.sha512() == hashlib.sha512(b"a" * 300_000 + b"b" * 300_000
                                             + b"c" * 300_000).digest()
    assert pipe.pending_bytes == 0


def test_a_discarded_digest_skips_its_queued_blocks():
    pipe = HashPipe()
    gate, ran = threading.Event(), []
    digest = pipe.digest()
    digest.update_later(lambda feed: gate.wait(5), 0)
    digest.update_later(lambda feed: ran.append(1), 0)
    digest.discard()
    gate.set()
    pipe.wait_for(digest)
    assert ran == []


def test_the_worker_exits_when_idle_and_starts_again_for_new_work():
    pipe = HashPipe(idle_seconds=0.05)
    first = pipe.digest()
    first.update(b"y" * 300_000)
    first.wait()
    deadline = time.monotonic() + 5
    while pipe._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipe._worker is None
    second = pipe.digest()
    second.update(b"z" * 300_000)
    assert second.sha256_hex() == hashlib.sha256(b"z" * 300_000).hexdigest()
