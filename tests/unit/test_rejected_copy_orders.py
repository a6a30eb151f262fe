"""Every message committed past is in Girder or in the dead-letter topic, whatever the
poll order: a file of two forged chunks whose whole-file sha512 fails, and a late copy
of its first chunk on the other partition (tests/integration/test_dead_letter.py's
case, which got only 4 of its 5 dead letters: the copy that came after the rejection
was taken for a duplicate that costs nothing, and committed without a dead letter)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from girder_upload_stream.shared_types import Recorder
from girder_upload_stream.wire.codec import Chunk, encode_chunk
from tests.unit.fakes import TOPIC, Log, make_processor, upload_all


class Letters(Recorder):
    """The dead-letter sink as the processor sees it: each rejected message's origin."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[int, int], list[str]] = {}

    def _add(self, partition: int, offset: int, kind: str) -> None:
        self.kinds.setdefault((partition, offset), []).append(kind)

    def message_rejected(self, msg, error) -> None:
        self._add(msg.partition, msg.offset, "message_rejected")

    def file_messages_rejected(self, rejected, where) -> None:
        for (_, partition), offset in where:
            self._add(partition, offset, "file_rejected")

    def chunk_rejected(self, msg, reason, kind="chunk_rejected", file=None) -> None:
        self._add(msg.partition, msg.offset, kind)


def _forged() -> list[tuple[str, bytes]]:
    wrong = hashlib.sha512(b"not these bytes").digest()
    return [encode_chunk(Chunk("forged.bin", wrong, hashlib.sha512(piece).digest(), 4 * i,
                               i + 1, 2, "sub", "", piece))
            for i, piece in enumerate((b"abcd", b"efgh"))]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_every_message_committed_past_is_dead_lettered_in_any_poll_order(order) -> None:
    first, second = _forged()
    log = Log()
    # chunk 1 on p0, chunk 2 on p1, a late copy of chunk 1 on p1 (after chunk 2)
    messages = [log.put(0, *first), log.put(1, *second), log.put(1, *first)]
    letters = Letters()
    proc = make_processor(recorder=letters)
    for i in order:
        proc.handle(messages[i])
    assert upload_all(proc) == []  # nothing of it reaches Girder
    assert proc.offsets.pending_count() == 0
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 2}  # committed past all
    # ... so each of the three is a dead letter, exactly once
    assert {o: len(k) for o, k in letters.kinds.items()} == {(0, 0): 1, (1, 0): 1, (1, 1): 1}
    kinds = sorted(k for ks in letters.kinds.values() for k in ks)
    # The late copy can only come after chunk 2 on its partition: it is a file_rejected
    # letter when chunk 1's other copy was not there yet, else a chunk_rejected one.
    assert kinds.count("file_rejected") >= 2


def test_a_copy_after_the_rejection_is_a_chunk_of_a_rejected_file() -> None:
    first, second = _forged()
    log = Log()
    letters = Letters()
    proc = make_processor(recorder=letters)
    for msg in (log.put(0, *first), log.put(1, *second), log.put(1, *first)):
        proc.handle(msg)
    assert letters.kinds == {(0, 0): ["file_rejected"], (1, 0): ["file_rejected"],
                             (1, 1): ["chunk_rejected"]}
