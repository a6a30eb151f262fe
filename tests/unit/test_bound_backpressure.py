"""The bound of files in progress (``--max_files_in_progress``) is back-pressure, not loss
(offsets rule 10): a chunk that would begin one more file is put off -- never committed
past, never recorded as failed -- and read again once a file makes room, while reading
goes on so that the files in progress complete (no deadlock).

Driven through the consumer's core (StreamProcessor and its OffsetTracker) by a small
simulated consumer that reads partitions unevenly, seeks where the tracker says, uploads
what completes and commits what the commit plan allows."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter

import pytest

from girder_upload_stream.assembly.reassembly import Mode
from girder_upload_stream.ledger.offsets import OffsetTracker, parse_metadata
from girder_upload_stream.ledger.records import FileState
from girder_upload_stream.shared_types import RawMessage
from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.unit.fakes import TOPIC, Clock, content, make_processor, make_runner, outcomes

MODES = [Mode.MEMORY, Mode.DISK]


class Topic:
    """Partitions of raw messages; a chunk's partition hashes its path and number, as
    the producer's key does, so one file's chunks spread over partitions."""

    def __init__(self, n_partitions: int = 4) -> None:
        self.parts: dict[tuple[str, int], list[RawMessage]] = {
            (TOPIC, p): [] for p in range(n_partitions)}
        self.data: dict[str, bytes] = {}

    def produce(self, name: str, data: bytes, size: int) -> None:
        self.data[name] = data
        for chunk in chunk_file(data, "", size, filename=name):
            key, value = encode_chunk(chunk)
            digest = hashlib.sha256(f"{name}:{chunk.chunk_i}".encode()).digest()
            tp = (TOPIC, digest[0] % len(self.parts))
            log = self.parts[tp]
            log.append(RawMessage(TOPIC, tp[1], len(log), key.encode(), value))

    def end(self) -> dict[tuple[str, int], int]:
        return {tp: len(log) for tp, log in self.parts.items() if log}


def consume(proc, topic: Topic, batches: dict[tuple[str, int], int],
            order: list[tuple[str, int]] | None = None, rounds: int = 10_000) -> Counter:
    """Read every partition in turn (``batches`` messages at a time, so partitions move
    unevenly), seek where the tracker asks, upload what completes, commit the plan; until
    nothing is left to read and no seek is asked. Returns the uploads per path."""
    position = dict.fromkeys(topic.parts, 0)
    uploads: Counter = Counter()
    for _ in range(rounds):
        moved = False
        for tp in order or list(topic.parts):
            batch = topic.parts[tp][position[tp]:position[tp] + batches[tp]]
            for msg in batch:
                proc.handle(msg)
            position[tp] += len(batch)
            moved |= bool(batch)
            for sought_tp, offset in proc.offsets.take_seeks().items():
                position[sought_tp] = offset
                proc.offsets.sought(sought_tp, offset)
                moved = True
            uploads.update(_upload(proc, topic.data))
        proc.offsets.committed(proc.offsets.commit_plan())
        if not moved:
            return uploads
    raise AssertionError("the consumer never settled (a seek loop)")


def _upload(proc, data: dict[str, bytes]) -> list[str]:
    """Upload what is ready (checking each file's bytes); the paths uploaded."""
    done = []
    for unit in proc.take_units():
        for f in unit.files:
            assert content(f) == data[f.rel_path], f.rel_path
            done.append(f.rel_path)
        proc.finish_unit(unit, outcomes(unit))
    return done


def committed(proc, topic: Topic) -> dict[tuple[str, int], int]:
    return {tp: proc.offsets._committed.get(tp, 0) for tp in topic.end()}


@pytest.mark.parametrize("mode", MODES)
def test_files_beyond_the_bound_wait_and_all_land_exactly_once(mode, tmp_path) -> None:
    """The reported loss: 120 files of 3 chunks on 4 partitions, all waiting before the
    consumer starts, bound 20. Every file lands once and the commit reaches the end."""
    rng, topic = random.Random(10), Topic()
    files = {f"f{n:03d}.bin": rng.randbytes(24) for n in range(120)}
    for name, data in files.items():
        topic.produce(name, data, 8)
    proc = make_processor(mode, tmp_path / "out" if mode is not Mode.MEMORY else None,
                          max_files_in_progress=20)
    batches = {tp: 40 + 15 * i for i, tp in enumerate(topic.parts)}  # uneven partitions
    uploads = consume(proc, topic, batches)
    assert uploads == Counter(dict.fromkeys(files, 1))  # every file, once
    assert proc.recorder.of("message_rejected") == []
    assert proc.counters.messages_put_off > 0  # the bound was reached
    assert proc.counters.files_failed == 0
    assert proc.offsets.put_off_count() == 0 and proc.offsets.pending_count() == 0
    assert committed(proc, topic) == topic.end()
    assert proc.reassembler.files_in_progress == 0


def test_crossed_files_at_a_bound_of_one_do_not_deadlock() -> None:
    """Each file's second chunk is behind the other file's first: with one place, the
    first partition read to its end puts B off; A still gets its chunk from the second
    partition (reading goes on past B's first chunk), lands, and makes room for B."""
    topic = Topic(2)
    topic.data = {"a.bin": b"A" * 16, "b.bin": b"B" * 16}
    a = list(chunk_file(b"A" * 16, "", 8, filename="a.bin"))
    b = list(chunk_file(b"B" * 16, "", 8, filename="b.bin"))
    for partition, chunk in ((0, a[0]), (0, b[1]), (1, b[0]), (1, a[1])):
        key, value = encode_chunk(chunk)
        log = topic.parts[(TOPIC, partition)]
        log.append(RawMessage(TOPIC, partition, len(log), key.encode(), value))
    proc = make_processor(max_files_in_progress=1)
    batches = dict.fromkeys(topic.parts, 10)
    uploads = consume(proc, topic, batches)
    assert uploads == Counter({"a.bin": 1, "b.bin": 1})
    assert committed(proc, topic) == topic.end()


def _interleaved(names: list[str]) -> tuple[Topic, list]:
    """One partition: the first chunk of every file, then the second of every file."""
    topic = Topic(1)
    files = [list(chunk_file(bytes([n]) * 16, "", 8, filename=name)) for n, name in enumerate(names)]
    topic.data = {name: bytes([n]) * 16 for n, name in enumerate(names)}
    log = topic.parts[(TOPIC, 0)]
    for i in range(2):
        for chunks in files:
            key, value = encode_chunk(chunks[i])
            log.append(RawMessage(TOPIC, 0, len(log), key.encode(), value))
    return topic, files


def test_a_put_off_chunk_holds_the_commit_and_a_restart_reads_it_again() -> None:
    """Until it is taken, a put-off chunk is pending: the commit stops at it, and the
    commit's metadata (rule 8) sends a restart back to it; it is never recorded failed."""
    topic, _ = _interleaved(["p0.bin", "p1.bin", "p2.bin"])
    tp, log = (TOPIC, 0), topic.parts[(TOPIC, 0)]
    proc = make_processor(max_files_in_progress=1)
    for msg in log[:3]:  # p0 #1 begins p0 (the bound); p1 #1 and p2 #1 are put off
        proc.handle(msg)
    assert proc.offsets.put_off_count() == 2 and proc.counters.messages_put_off == 2
    assert proc.recorder.of("message_rejected") == []
    proc.handle(log[3])  # p0 #2: p0 completes (ready, pending until it is uploaded)
    [(offset, metadata)] = proc.offsets.commit_plan().values()
    assert offset == 0 and parse_metadata(metadata) == 4
    restart = OffsetTracker()  # a restart from this commit reads 1 and 2 again
    restart.assigned(tp, offset, metadata)
    assert not restart.skippable(tp, 1) and not restart.skippable(tp, 2)
    assert _upload(proc, topic.data) == ["p0.bin"]
    [(offset, _)] = proc.offsets.commit_plan().values()
    assert offset == 1  # p0 is done: the commit stops at the first put-off chunk


def test_a_replay_skips_what_this_run_handled_and_takes_the_put_off_chunks() -> None:
    """Going back to the first put-off chunk reads the partition again: what was handled
    before is skipped (taken again, an uploaded file would be a second production)."""
    topic, _ = _interleaved(["r0.bin", "r1.bin", "r2.bin"])
    tp = (TOPIC, 0)
    proc = make_processor(max_files_in_progress=1)
    # 0 r0#1 taken, 1 r1#1 and 2 r2#1 put off, 3 r0#2 completes r0, 4 r1#2 begins r1,
    # 5 r2#2 put off; back to 1: r1 completes, 2 begins r2, 3 and 4 skipped, 5 ends r2.
    uploads = consume(proc, topic, {tp: 100})
    assert uploads == Counter({"r0.bin": 1, "r1.bin": 1, "r2.bin": 1})
    assert proc.counters.messages_put_off == 3
    assert proc.counters.messages_skipped == 2
    assert proc.recorder.of("message_rejected") == []
    assert committed(proc, topic) == topic.end()


def _partials(n: int, tp=(TOPIC, 0)) -> list[RawMessage]:
    """The first chunk of each of ``n`` two-chunk files (never completed), on ``tp``."""
    msgs = []
    for i in range(n):
        key, value = encode_chunk(next(iter(chunk_file(bytes([i]) * 16, "", 8,
                                                        filename=f"s{i}.bin"))))
        msgs.append(RawMessage(TOPIC, tp[1], i, key.encode(), value))
    return msgs


def test_stale_files_make_room_for_the_put_off_chunks() -> None:
    """A flood holds every place: nothing is sought back (it would not help) until the
    stale files are released; then the partition is read again from the first put-off
    chunk and each released file is forgotten to take one."""
    wall = Clock(1000.0, step=0.0)
    proc = make_processor(max_files_in_progress=5, stale_partial_seconds=60.0,
                          wall_clock=wall)
    proc.reassembler._clock = wall
    msgs, tp = _partials(8), (TOPIC, 0)
    for msg in msgs:
        proc.handle(msg)
    assert proc.offsets.put_off_count() == 3 and proc.offsets.take_seeks() == {}
    wall.now += 61.0
    proc.expire_stale()  # five stale files: released, they make room
    assert proc.offsets.committable() == {tp: 5}  # the first put-off chunk holds it
    assert proc.offsets.take_seeks() == {tp: 5}
    proc.offsets.sought(tp, 5)
    assert proc.offsets.take_seeks() == {}  # a pass under way: not asked again
    for msg in msgs[5:]:
        proc.handle(msg)
    assert proc.offsets.put_off_count() == 0
    assert proc.recorder.of("message_rejected") == []
    assert proc.reassembler.files_in_progress == 5  # two released ones, three new
    assert proc.offsets.committable() == {tp: 5}  # held there by the three new files


def test_a_lost_partition_forgets_its_put_off_chunks() -> None:
    """The next owner reads them from the commit: nothing of them is kept here."""
    proc = make_processor(max_files_in_progress=2)
    for msg in _partials(4):
        proc.handle(msg)
    assert proc.offsets.put_off_count() == 2
    proc.offsets.forget([(TOPIC, 0)])
    assert proc.offsets.put_off_count() == 0 and proc.offsets.pending_count() == 0
    assert proc.offsets.take_seeks() == {}


def test_a_run_that_stops_with_chunks_still_waiting_says_so(caplog) -> None:
    """The stop leaves them uncommitted and says that the next run reads them again."""
    runner, group, _ = make_runner()
    runner.processor.reassembler.max_files_in_progress = 1
    for msg in _partials(3):  # one file begun, two waiting
        group.put(msg.partition, msg.key, msg.value)
    runner.step()
    with caplog.at_level(logging.WARNING, "girder_upload_stream.loop.runner"):
        runner.shutdown("test")
    assert "2 chunk(s) of files beyond --max_files_in_progress still wait, uncommitted" \
        in caplog.text
    assert group.committed == {(TOPIC, 0): 0}


def test_a_put_off_duplicate_of_a_file_settled_since_is_done_not_a_new_file() -> None:
    """Found by the commit-rule property at the bound: a chunk put off, whose file then
    began and completed from another copy of that chunk on another partition, was taken
    later as the first chunk of a new production: a file that could never complete held
    a place and the commit for ever. Read in its turn, it was a duplicate: it is done."""
    topic = Topic(2)
    a = list(chunk_file(b"A" * 16, "", 8, filename="a.bin"))
    b = list(chunk_file(b"B" * 16, "", 8, filename="b.bin"))
    topic.data = {"a.bin": b"A" * 16, "b.bin": b"B" * 16}
    layout = ((0, a[0]), (0, b[0]), (1, a[1]), (1, b[0]), (1, b[1]))  # b's first twice
    for partition, chunk in layout:
        key, value = encode_chunk(chunk)
        log = topic.parts[(TOPIC, partition)]
        log.append(RawMessage(TOPIC, partition, len(log), key.encode(), value))
    proc = make_processor(max_files_in_progress=1)
    # Partition 0 first: b's first chunk put off; partition 1 completes a, then b from
    # its other copy; b is uploaded before partition 0 is read again.
    uploads = consume(proc, topic, dict.fromkeys(topic.parts, 10))
    assert uploads == Counter({"a.bin": 1, "b.bin": 1})
    assert proc.reassembler.files_in_progress == 0
    assert not proc.ledger.in_state(FileState.ASSEMBLING)
    assert committed(proc, topic) == topic.end()
