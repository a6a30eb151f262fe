"""Partitions revoked in a rebalance: files waiting for upload whose messages are all on
them are left to the next owner (no race to Girder), the others are kept."""

from __future__ import annotations

from girder_upload_stream.shared_types import Outcome
from tests.unit.fakes import TOPIC, Log, encoded, upload_all
from tests.unit.fakes import make_processor as make

P0, P1 = (TOPIC, 0), (TOPIC, 1)


def test_files_only_on_revoked_partitions_are_handed_over_and_rebuilt_if_they_return():
    log = Log()
    only_p0 = [log.put(0, *c) for c in encoded(b"A" * 16, "a.bin")]
    b1, b2 = encoded(b"B" * 16, "b.bin")
    both = [log.put(0, *b1), log.put(1, *b2)]
    proc = make()
    for m in only_p0 + both:
        proc.handle(m)
    assert proc.hand_over([P0]) == 1
    proc.offsets.forget([P0])
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["b.bin"]
    # p0 comes back (or never left): its messages rebuild a.bin, they are not "done".
    proc.assigned([])
    for m in only_p0:
        proc.handle(m)
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["a.bin"]
    assert proc.offsets.pending_count() == 0


def test_nothing_is_handed_over_when_other_partitions_are_revoked():
    log = Log()
    proc = make()
    for c in encoded(b"A" * 16, "a.bin"):
        proc.handle(log.put(0, *c))
    assert proc.hand_over([P1]) == 0
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["a.bin"]


def test_units_in_flight_at_a_revoke_check_for_twins_also_in_a_copy_of_the_unit():
    from girder_upload_stream.ledger.units import UploadChannel, UploadUnit, is_shared, mark_moved
    channel = UploadChannel()
    unit = UploadUnit(7, channel=channel)
    copy = UploadUnit(7, channel=channel)  # what a task runner may hold instead
    assert not is_shared(copy)
    mark_moved(unit)
    assert is_shared(unit) and is_shared(copy)
    assert not is_shared(UploadUnit(8, channel=channel))
    assert not is_shared(UploadUnit(7, channel=UploadChannel()))  # another flow run's


def test_files_waiting_for_a_retry_are_handed_over_too():
    log = Log()
    proc = make(retry_delay=0.0)
    for c in encoded(b"A" * 16, "a.bin"):
        proc.handle(log.put(0, *c))
    for c in encoded(b"C" * 16, "c.bin"):
        proc.handle(log.put(1, *c))
    upload_all(proc, Outcome.FAILED_TRANSIENT)  # both now wait for their retry
    assert proc.hand_over([P0]) == 1
    proc.offsets.forget([P0])
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["c.bin"]
    assert proc.idle


def test_a_file_handed_over_with_a_copy_counted_is_rebuilt_when_its_chunks_return():
    """Found by the commit-rule property test: a one-chunk file read twice (a copy
    counted) whose partition is lost before upload came back as "a copy, counted" and
    was committed without ever reaching Girder."""
    log = Log()
    [pair] = encoded(b"once", "o.bin", size=64)
    msgs = [log.put(0, *pair), log.put(0, *pair)]
    proc = make()
    for m in msgs:
        proc.handle(m)
    assert proc.hand_over([P0]) == 1
    proc.offsets.forget([P0])
    proc.assigned([])
    for m in msgs:  # read again from the (never moved) commit
        proc.handle(m)
    assert proc.offsets.committable() == {P0: 0}  # held: o.bin is not in Girder yet
    assert [f.rel_path for u in upload_all(proc) for f in u.files] == ["o.bin"]
    assert proc.offsets.committable() == {P0: 2}
