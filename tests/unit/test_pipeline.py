"""Unit tests for girder_upload_stream.ledger.processor (StreamProcessor: messages in, upload
units and committable offsets out)."""

from __future__ import annotations

import hashlib
import random
import re

import msgpack
import pytest

from girder_upload_stream.wire.codec import Chunk, decode_chunk, encode_chunk
from girder_upload_stream.errors import StorageError
from girder_upload_stream.ledger.processor import Counters
from girder_upload_stream.shared_types import FileOutcome, Outcome, file_generation
from girder_upload_stream.assembly.reassembly import Mode
from tests.unit.fakes import (TOPIC, Clock, Log, content, encoded, lowest_offsets, one_chunk,
                              outcomes, random_files, scatter, upload_all)
from tests.unit.fakes import make_processor as make

# ---------------------------------------------------------------- the happy path


@pytest.mark.parametrize("mode", [Mode.MEMORY, Mode.DISK])
def test_shuffled_chunks_with_duplicates_become_files_and_commit_after_upload(
        mode, tmp_path) -> None:
    rng = random.Random(1)
    files = random_files(rng, 12)
    log = Log()
    messages = scatter(log, files, rng, duplicates=10)
    proc = make(mode, tmp_path / "out" if mode is not Mode.MEMORY else None)
    for msg in messages:
        proc.handle(msg)

    # Nothing uploaded yet: every partition is held at its first message.
    held = lowest_offsets(messages)
    assert proc.offsets.committable() == held
    assert proc.offsets.pending_count() == len(messages)

    units = proc.take_units()
    got = {f.rel_path: content(f) for u in units for f in u.files}
    assert got == files
    for unit in units:
        for f in unit.files:
            assert f.sha256 == hashlib.sha256(files[f.rel_path]).hexdigest()
            if mode is Mode.DISK:  # uploaded from the verified staging file
                assert f.data is None and f.path.parent == proc.reassembler.staging_dir
                assert f.path.read_bytes() == files[f.rel_path]
    assert proc.take_units() == []  # each file once
    assert proc.offsets.committable() == held

    for unit in units:
        proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == log.end()
    assert proc.offsets.pending_count() == 0
    assert proc.counters.files_uploaded == len(files)
    assert proc.counters.messages_read == len(messages)
    assert proc.idle and proc.bytes_held == 0
    outcomes_recorded = proc.recorder.of("file_outcome")
    # A re-sent chunk of a one-chunk file is a whole second copy: registered again.
    assert set(c[1] for c in outcomes_recorded) == set(files)
    again = [c for c in outcomes_recorded if c[2] is Outcome.SKIPPED_IDENTICAL]
    assert len(outcomes_recorded) == len(files) + len(again)


def test_uploads_release_offsets_file_by_file() -> None:
    log = Log()
    proc = make(max_unit_files=1)
    a1, a2 = encoded(b"A" * 16, "a.bin")
    b1, = encoded(b"B" * 5, "b.bin")
    msgs = [log.put(0, *a1), log.put(0, *b1), log.put(0, *a2)]
    for m in msgs:
        proc.handle(m)
    units = proc.take_units()
    # b completed first, but a holds the oldest offset: a is uploaded first.
    assert [[f.rel_path for f in u.files] for u in units] == [["a.bin"], ["b.bin"]]
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.finish_unit(units[1], outcomes(units[1]))  # b: offset 1 done, a still holds 0
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.finish_unit(units[0], outcomes(units[0]))
    assert proc.offsets.committable() == {(TOPIC, 0): 3}


@pytest.mark.parametrize("outcome", [Outcome.UPLOADED, Outcome.REPLACED,
                                     Outcome.SKIPPED_IDENTICAL, Outcome.SKIPPED_DIFFERENT])
def test_durable_outcomes_release_and_count(outcome) -> None:
    log = Log()
    proc = make()
    proc.handle(one_chunk(log, 2, b"hello", "h.txt"))
    upload_all(proc, outcome)
    assert proc.offsets.committable() == {(TOPIC, 2): 1}
    c = proc.counters
    uploaded = outcome in (Outcome.UPLOADED, Outcome.REPLACED)
    different = outcome is Outcome.SKIPPED_DIFFERENT  # not "already in Girder"
    assert (c.files_uploaded, c.files_skipped, c.files_skipped_different, c.files_failed) == \
        ((1, 0, 0, 0) if uploaded else (0, 0, 1, 0) if different else (0, 1, 0, 0))
    assert c.messages_processed == 1


# ---------------------------------------------------------------- grouping


def test_units_respect_max_unit_files() -> None:
    log = Log()
    proc = make(max_unit_files=2)
    for i in range(5):
        proc.handle(one_chunk(log, i % 4, bytes([i]) * 10, f"f{i}.bin"))
    units = proc.take_units()
    assert [[f.rel_path for f in u.files] for u in units] == [
        ["f0.bin", "f1.bin"], ["f2.bin", "f3.bin"], ["f4.bin"]]
    assert len({u.unit_id for u in units}) == 3
    assert proc.inflight_units == 3


def test_units_respect_max_unit_bytes_and_big_file_travels_alone() -> None:
    log = Log()
    proc = make(max_unit_bytes=25)
    sizes = [10, 10, 10, 100, 5, 20]
    for i, size in enumerate(sizes):
        proc.handle(one_chunk(log, 0, bytes([i + 1]) * size, f"f{i}.bin"))
    units = proc.take_units()
    assert [[f.size for f in u.files] for u in units] == [[10, 10], [10], [100], [5, 20]]
    assert all(u.nbytes <= 25 or len(u.files) == 1 for u in units)
    more = [one_chunk(log, 0, b"x" * 3, "late.bin")]
    proc.handle(more[0])
    [late] = proc.take_units()
    assert late.unit_id > max(u.unit_id for u in units)  # ids never reused


# ---------------------------------------------------------------- failures


def test_transient_failure_keeps_offsets_and_retries_after_delay() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=10.0)
    msg = one_chunk(log, 1, b"retry me", "r.txt")
    proc.handle(msg)
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
    assert proc.offsets.committable() == {(TOPIC, 1): 0}
    assert not proc.idle
    assert proc.bytes_held == len(b"retry me")
    clock.now += 9.9
    assert proc.take_units() == []
    clock.now += 0.1
    [again] = proc.take_units()
    assert again.unit_id != unit.unit_id
    assert [f.data for f in again.files] == [b"retry me"]
    assert proc.offsets.committable() == {(TOPIC, 1): 0}
    proc.finish_unit(again, outcomes(again))
    assert proc.offsets.committable() == {(TOPIC, 1): 1}
    assert proc.counters.files_uploaded == 1 and proc.counters.files_failed == 0
    assert [c[2] for c in proc.recorder.of("file_outcome")] == [
        Outcome.FAILED_TRANSIENT, Outcome.UPLOADED]
    assert proc.idle


def test_retried_files_go_first_with_new_ones() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=1.0)
    proc.handle(one_chunk(log, 0, b"old", "old.txt"))
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
    proc.handle(one_chunk(log, 0, b"new", "new.txt"))
    clock.now += 1
    [both] = proc.take_units()
    assert [f.rel_path for f in both.files] == ["old.txt", "new.txt"]


def test_terminal_failure_releases_and_counts_failed() -> None:
    log = Log()
    proc = make()
    proc.handle(one_chunk(log, 3, b"no way", "bad.txt"))
    [unit] = proc.take_units()
    proc.finish_unit(unit, [FileOutcome("bad.txt", unit.file_keys[0],
                                        Outcome.FAILED_TERMINAL, "forbidden")])
    assert proc.offsets.committable() == {(TOPIC, 3): 1}
    assert proc.counters.files_failed == 1 and proc.counters.files_uploaded == 0
    assert proc.idle
    assert proc.take_units() == []


def test_missing_outcome_counts_as_transient() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=5)
    proc.handle(one_chunk(log, 0, b"a", "a.txt"))
    proc.handle(one_chunk(log, 0, b"b", "b.txt"))
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit)[:1])  # b's outcome missing
    assert proc.offsets.committable() == {(TOPIC, 0): 1}
    clock.now += 5
    [again] = proc.take_units()
    assert [f.rel_path for f in again.files] == ["b.txt"]


def test_fail_unit_retries_every_file_of_the_unit() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=3)
    for i in range(3):
        proc.handle(one_chunk(log, i, b"x%d" % i, f"f{i}.txt"))
    [unit] = proc.take_units()
    proc.fail_unit(unit, "RuntimeError: boom")
    assert proc.inflight_units == 0
    assert proc.offsets.committable() == {(TOPIC, i): 0 for i in range(3)}
    assert proc.counters.files_failed == 0
    clock.now += 3
    [again] = proc.take_units()
    assert sorted(f.rel_path for f in again.files) == ["f0.txt", "f1.txt", "f2.txt"]
    proc.finish_unit(again, outcomes(again))
    assert proc.offsets.committable() == {(TOPIC, i): 1 for i in range(3)}


# ---------------------------------------------------------------- bad input


def hostile_value(filename: str, subdir: str) -> tuple[str, bytes]:
    data = b"evil"
    digest = hashlib.sha512(data).digest()
    return encode_chunk(Chunk(filename, digest, digest, 0, 1, 1, subdir, "", data))


def test_bad_messages_are_recorded_and_never_hold_commits() -> None:
    log = Log()
    proc = make()
    spy = proc.recorder
    good1, good2 = encoded(b"G" * 12, "g.bin")
    proc.handle(log.put(0, *good1))  # a pending file holds partition 0 at offset 0
    key, value = encoded(b"other", "o.bin")[0]
    bad = [
        log.put(1, b"junk", b"\xc1\xff garbage"),
        log.put(1, None, None),
        log.put(1, b"wrong_key_chunk_1_of_1", value),  # key names another file
        log.put(1, *hostile_value("x", "..")),
        log.put(1, *hostile_value("..", "")),
        log.put(2, b"k", msgpack.packb({"not": "an array"})),
        log.put(2, key, value[:-3]),  # truncated
    ]
    for msg in bad:
        proc.handle(msg)
    rejected = spy.of("message_rejected")
    assert [(c[1], c[2]) for c in rejected] == [(m.partition, m.offset) for m in bad]
    assert any("unsafe path" in c[3] for c in rejected)
    assert any("disagrees" in c[3] for c in rejected)
    assert proc.counters.messages_rejected == len(bad)
    assert proc.counters.messages_read == len(bad) + 1
    assert proc.offsets.committable() == {(TOPIC, 0): 0, (TOPIC, 1): 5, (TOPIC, 2): 2}
    assert proc.reassembler.in_progress()[0].rel_path == "g.bin"
    assert len(proc.reassembler.in_progress()) == 1
    proc.handle(log.put(3, *good2))
    upload_all(proc)
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 5, (TOPIC, 2): 2,
                                          (TOPIC, 3): 1}
    assert proc.offsets.pending_count() == 0


def test_file_with_mismatched_hash_is_rejected_and_released() -> None:
    log = Log()
    proc = make()
    pieces = [b"abcd", b"efgh"]
    wrong = hashlib.sha512(b"something else").digest()
    msgs = []
    for i, piece in enumerate(pieces, start=1):
        chunk = Chunk("m.bin", wrong, hashlib.sha512(piece).digest(), 4 * (i - 1), i, 2,
                      "", "", piece)
        msgs.append(log.put(i - 1, *encode_chunk(chunk)))
    for m in msgs:
        proc.handle(m)
    assert proc.recorder.of("file_rejected") == [
        ("file_rejected", "m.bin", proc.recorder.of("file_rejected")[0][2])]
    assert "hash" in proc.recorder.of("file_rejected")[0][2]
    assert proc.counters.files_failed == 1
    assert proc.take_units() == []
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 1}
    # Only its bytes failed: its messages are retried by the next run (rule 9)...
    assert "read again by the next run" in proc.recorder.of("file_rejected")[0][2]
    assert proc.offsets.failed_spans((TOPIC, 0), 1) == [(0, 1)]
    # A late copy of a chunk it held adds nothing: done at once...
    proc.handle(log.put(0, msgs[0].key, msgs[0].value))
    assert proc.offsets.committable() == {(TOPIC, 0): 2, (TOPIC, 1): 1}
    # ...but a chunk with other bytes is a new choice, hashed at once (it fails too).
    other = Chunk("m.bin", wrong, hashlib.sha512(b"wxyz").digest(), 0, 1, 2, "", "", b"wxyz")
    proc.handle(log.put(0, *encode_chunk(other)))
    assert proc.counters.files_failed == 2
    assert proc.offsets.committable() == {(TOPIC, 0): 3, (TOPIC, 1): 1}
    assert proc.reassembler.in_progress() == []


def test_storage_error_keeps_the_message_pending(monkeypatch) -> None:
    log = Log()
    proc = make()

    def broken(chunk, tag=None):
        raise StorageError("disk full")

    msg = one_chunk(log, 0, b"data", "d.bin")
    monkeypatch.setattr(proc.reassembler, "add", broken)
    proc.handle(msg)
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    assert proc.counters.messages_rejected == 0
    assert proc.recorder.calls == []
    monkeypatch.undo()
    proc.handle(log.put(0, msg.key, msg.value))  # re-delivered later: completes it
    upload_all(proc)
    assert proc.offsets.committable() == {(TOPIC, 0): 2}


def test_download_regex_filters_without_reassembly() -> None:
    log = Log()
    proc = make(download_regex=re.compile(r"keep/"))
    msgs = []
    for rel, data in (("keep/a.bin", b"A" * 20), ("skip/b.bin", b"B" * 20),
                      ("c.bin", b"C" * 20)):
        sub, _, name = rel.rpartition("/")
        msgs += [log.put(p, *pair) for p, pair in enumerate(encoded(data, name, sub))]
    for m in msgs:
        proc.handle(m)
    assert [p.rel_path for p in proc.reassembler.in_progress()] == []
    [unit] = proc.take_units()
    assert [f.rel_path for f in unit.files] == ["keep/a.bin"]
    # Only keep/a.bin's messages are pending (offset 0 of partitions 0..2).
    assert proc.offsets.pending_count() == 3
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == log.end()
    assert proc.counters.messages_read == 9
    assert proc.counters.messages_processed == 3
    assert proc.counters.messages_rejected == 0
    # Matched from the start of the path (re.match, as OpenMSIStream): "skip/b.bin" and
    # "c.bin" are two files skipped, each counted once, whatever its number of chunks.
    assert proc.counters.files_skipped_by_regex == 2


# ---------------------------------------------------------------- duplicates


def test_duplicate_of_a_file_being_uploaded_stays_pending_until_upload_ends() -> None:
    log = Log()
    proc = make()
    first = one_chunk(log, 0, b"payload", "p.bin")
    proc.handle(first)
    [unit] = proc.take_units()
    dup = log.put(0, first.key, first.value)  # e.g. a producer retry
    proc.handle(dup)
    assert proc.take_units() == []  # not uploaded twice
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == {(TOPIC, 0): 2}
    # Once durable, a further duplicate is done at once.
    proc.handle(log.put(0, first.key, first.value))
    assert proc.offsets.committable() == {(TOPIC, 0): 3}
    assert proc.offsets.pending_count() == 0


def test_duplicate_of_a_file_waiting_to_retry_stays_pending() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=5)
    first = one_chunk(log, 0, b"payload", "p.bin")
    proc.handle(first)
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
    proc.handle(log.put(1, first.key, first.value))
    assert proc.offsets.committable() == {(TOPIC, 0): 0, (TOPIC, 1): 0}
    clock.now += 5
    upload_all(proc)
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 1}


def test_duplicate_chunk_of_a_file_still_assembling_stays_pending() -> None:
    log = Log()
    proc = make()
    c1, c2, c3 = encoded(b"0123456789abcdefXYZ", "s.bin")
    proc.handle(log.put(0, *c1))
    proc.handle(log.put(1, *c1))  # duplicate on another partition
    assert proc.offsets.committable() == {(TOPIC, 0): 0, (TOPIC, 1): 0}
    proc.handle(log.put(2, *c2))
    proc.handle(log.put(2, *c3))
    upload_all(proc)
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 1, (TOPIC, 2): 2}


def test_redelivery_after_revoke_of_a_file_being_uploaded_stays_pending() -> None:
    """A rebalance moves a partition between the group's consumers: the tracker forgets
    it and the new owner reads it again from the committed offset, while the file it
    holds is still uploading. Committing past it then would lose the file on a crash."""
    log = Log()
    proc = make()
    first = one_chunk(log, 0, b"single chunk", "one.bin")
    proc.handle(first)
    [unit] = proc.take_units()
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.offsets.forget([(TOPIC, 0)])  # revoked (commit at 0 happened before)
    proc.handle(first)  # re-delivered to the new owner, same offset
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
    assert proc.offsets.committable() == {(TOPIC, 0): 0}


def test_redelivery_after_revoke_of_a_file_still_assembling_stays_pending() -> None:
    log = Log()
    proc = make()
    c1, c2, c3 = encoded(b"0123456789abcdefXYZ", "s.bin")
    m1, m2 = log.put(0, *c1), log.put(0, *c2)
    proc.handle(m1)
    proc.handle(m2)
    proc.offsets.forget([(TOPIC, 0)])
    proc.handle(m1)  # re-delivered
    proc.handle(m2)
    proc.handle(log.put(0, *c3))
    [unit] = proc.take_units()
    assert proc.offsets.committable() == {(TOPIC, 0): 0}
    proc.finish_unit(unit, outcomes(unit))
    assert proc.offsets.committable() == {(TOPIC, 0): 3}


def test_restart_rereads_part_of_a_finished_file_spanning_partitions() -> None:
    log = Log()
    g1, g2 = encoded(b"G" * 16, "g.bin")
    f1, f2 = encoded(b"F" * 16, "f.bin")
    first_run = make()
    msgs = [log.put(0, *g1), log.put(0, *f1), log.put(1, *f2)]
    for m in msgs:
        first_run.handle(m)
    upload_all(first_run)  # f is in Girder; g waits for its 2nd chunk
    committed = first_run.offsets.committable()
    assert committed == {(TOPIC, 0): 0, (TOPIC, 1): 1}
    # Crash; a new process re-reads partition 0 from 0 (partition 1 from 1). The
    # registries tell it which files are already processed.
    second_run = make(known_done=set(first_run.known_done))
    f_hash = decode_chunk(f1[1]).file_hash
    assert second_run.known_done == {("f.bin", file_generation(f_hash))}
    for m in msgs[:2]:
        second_run.handle(m)
    second_run.handle(log.put(0, *g2))
    upload_all(second_run)
    assert second_run.offsets.committable() == {(TOPIC, 0): 3}


# ---------------------------------------------------------------- state


def test_bytes_held_and_idle_in_memory_mode() -> None:
    clock = Clock()
    log = Log()
    proc = make(clock=clock, retry_delay=1)
    assert proc.idle and proc.bytes_held == 0
    c1, c2 = encoded(b"x" * 12, "m.bin")
    proc.handle(log.put(0, *c1))
    assert proc.bytes_held == 8
    assert proc.idle  # assembling does not count
    proc.handle(log.put(0, *c2))
    assert proc.bytes_held == 12 and not proc.idle  # ready
    [unit] = proc.take_units()
    assert proc.bytes_held == 12 and not proc.idle  # uploading
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TRANSIENT))
    assert proc.bytes_held == 12 and not proc.idle  # waiting to retry
    clock.now += 1
    upload_all(proc)
    assert proc.bytes_held == 0 and proc.idle


def test_bytes_held_stays_zero_in_disk_mode(tmp_path) -> None:
    log = Log()
    proc = make(Mode.DISK, tmp_path)
    c1, c2 = encoded(b"y" * 12, "d.bin")
    proc.handle(log.put(0, *c1))
    assert proc.bytes_held == 0
    proc.handle(log.put(0, *c2))
    [unit] = proc.take_units()
    assert proc.bytes_held == 0 and not proc.idle
    [done] = unit.files
    assert done.path.read_bytes() == b"y" * 12
    proc.finish_unit(unit, outcomes(unit))
    assert proc.idle


def test_counters() -> None:
    log = Log()
    proc = make()
    msgs = [log.put(i % 4, k, v) for i, (k, v) in enumerate(encoded(b"z" * 30, "z.bin"))]
    msgs.append(one_chunk(log, 1, b"tiny", "t.bin"))
    msgs.append(log.put(2, b"bad", b"not msgpack \xc1"))
    for m in msgs:
        proc.handle(m)
    c = proc.counters
    value_bytes = [len(m.value) for m in msgs]
    assert (c.messages_read, c.bytes_read) == (len(msgs), sum(value_bytes))
    assert (c.messages_processed, c.bytes_processed) == (0, 0)
    [unit] = proc.take_units()
    proc.finish_unit(unit, [FileOutcome("z.bin", ("z.bin", unit.files[0].file_hash),
                                        Outcome.UPLOADED),
                            FileOutcome("t.bin", ("t.bin", unit.files[1].file_hash),
                                        Outcome.SKIPPED_IDENTICAL)])
    assert c.messages_processed == 5  # 4 chunks of z + 1 of t; the bad one is not
    assert c.bytes_processed == sum(value_bytes[:5])
    assert (c.files_uploaded, c.files_skipped, c.files_failed, c.messages_rejected) == \
        (1, 1, 0, 1)
    assert c.take_delta()["messages_read"] == 6
    more = one_chunk(log, 0, b"more", "more.bin")
    proc.handle(more)
    delta = c.take_delta()
    assert delta["messages_read"] == 1 and delta["messages_processed"] == 0
    assert delta["bytes_read"] == len(more.value)
    assert c.take_delta() == {k: 0 for k in delta}
    assert "_last" not in delta


def test_counters_take_delta_starts_from_zero() -> None:
    c = Counters(messages_read=3, bytes_read=10)
    assert c.take_delta() == {"messages_read": 3, "bytes_read": 10, "messages_processed": 0,
                              "bytes_processed": 0, "files_uploaded": 0, "files_skipped": 0,
                              "files_found_in_girder": 0,
                              "files_failed": 0, "messages_rejected": 0,
                              "messages_skipped": 0, "messages_put_off": 0,
                              "files_to_retry": 0,
                              "files_skipped_different": 0, "files_skipped_by_regex": 0}


def test_chunk_added_recorded_for_accepted_chunks_only() -> None:
    log = Log()
    proc = make()
    c1, c2 = encoded(b"q" * 10, "q.bin")
    proc.handle(log.put(0, *c1))
    proc.handle(log.put(0, *c1))  # duplicate: not recorded again
    proc.handle(log.put(0, *c2))  # completes: no chunk_added
    assert proc.recorder.of("chunk_added") == [("chunk_added", "q.bin", 1)]


def test_duplicates_count_as_read_but_not_as_processed() -> None:
    log = Log()
    proc = make()
    c1, c2 = encoded(b"d" * 12, "dup.bin")
    msgs = [log.put(0, *c1), log.put(1, *c1), log.put(2, *c2)]
    for m in msgs:
        proc.handle(m)
    upload_all(proc)
    c = proc.counters
    assert (c.messages_read, c.bytes_read) == (3, sum(len(m.value) for m in msgs))
    assert (c.messages_processed, c.bytes_processed) == (
        2, len(msgs[0].value) + len(msgs[2].value))
    assert proc.offsets.committable() == {(TOPIC, 0): 1, (TOPIC, 1): 1, (TOPIC, 2): 1}


def test_a_file_produced_again_after_its_upload_failed_for_good_holds_its_commit() -> None:
    """Hole: a file whose upload failed for good was later taken as "already in Girder"
    when produced again, so its new messages were committed at once and a crash before
    the new upload lost it."""
    log = Log()
    proc = make()
    pairs = encoded(b"F" * 12, "f.bin")
    for pair in pairs:
        proc.handle(log.put(0, *pair))
    [unit] = proc.take_units()
    proc.finish_unit(unit, outcomes(unit, Outcome.FAILED_TERMINAL))
    assert proc.offsets.committable() == {(TOPIC, 0): 2}
    assert ("f.bin", file_generation(unit.files[0].file_hash)) not in proc.known_done
    for pair in pairs:  # the producer sends it again
        proc.handle(log.put(1, *pair))
    assert proc.offsets.committable() == {(TOPIC, 0): 2, (TOPIC, 1): 0}  # held
    [again] = proc.take_units()
    assert [f.rel_path for f in again.files] == ["f.bin"]
    proc.finish_unit(again, outcomes(again))
    assert proc.offsets.committable() == {(TOPIC, 0): 2, (TOPIC, 1): 2}
    assert proc.counters.files_uploaded == 1 and proc.counters.files_failed == 1
