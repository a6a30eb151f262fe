"""Twin checks in a group re-keyed by file (kafka/gain_marks.py): a file whose messages
were all written after this member gained their partition cannot be uploaded by another
member, so its item is not checked for twins; everything else still is, and a revoke
brings the checks back for what is in flight."""

from __future__ import annotations

from girder_upload_stream.kafka.gain_marks import GainMarks
from girder_upload_stream.ledger.units import (UploadChannel, UploadUnit, is_shared,
                                               items_shared, mark_moved)
from girder_upload_stream.shared_types import PartitionInfo
from tests.unit.fakes import TOPIC, FakeGroup, put_file
from tests.unit.fakes import make_runner as make

P0, P1 = (TOPIC, 0), (TOPIC, 1)


def _marks(**highs: int | None) -> GainMarks:
    marks = GainMarks(keyed_by_file=True)
    marks.gained([PartitionInfo(TOPIC, int(p[1:]), None, None, 0, high)
                  for p, high in highs.items()])
    return marks


def test_messages_written_after_the_gain_are_alone_the_backlog_is_not():
    marks = _marks(p0=10, p1=0)
    assert marks.alone([(P0, 10), (P0, 11)]) and marks.alone([(P1, 0)])
    assert not marks.alone([(P0, 9)])  # a previous owner may have read it
    assert not marks.alone([(P0, 12), (P0, 9)])  # one backlog message is enough
    assert not marks.alone([])  # a retry of an earlier run's file: nothing to go by
    assert not marks.alone([((TOPIC, 2), 50)])  # not ours


def test_an_unknown_end_of_log_a_lost_partition_or_an_unkeyed_topic_is_never_alone():
    assert not _marks(p0=None).alone([(P0, 5)])
    marks = _marks(p0=3)
    marks.lost([P0])
    assert not marks.alone([(P0, 5)])
    marks.gained([PartitionInfo(TOPIC, 0, None, None, 0, 8)])  # back, with a new mark
    assert not marks.alone([(P0, 5)]) and marks.alone([(P0, 8)])
    plain = GainMarks(keyed_by_file=False)
    plain.gained([PartitionInfo(TOPIC, 0, None, None, 0, 0)])
    assert not plain.alone([(P0, 5)])


def test_an_alone_unit_checks_folders_not_items_until_its_partitions_move():
    channel = UploadChannel()
    unit = UploadUnit(1, channel=channel, shared=True, alone=True)
    copy = UploadUnit(1, channel=channel, shared=True, alone=True)  # a task runner's copy
    assert is_shared(unit) and not items_shared(unit)
    mark_moved(unit)
    assert items_shared(unit) and items_shared(copy)
    assert items_shared(UploadUnit(2, shared=True)) and not items_shared(UploadUnit(3))


class _KeyedGroup(FakeGroup):
    """A fake member of a shared group re-keyed by file, which gained its partitions
    when their logs ended at ``marks``."""

    shared = True

    def __init__(self, marks: dict[int, int]) -> None:
        super().__init__(n_partitions=2)
        self.gains = GainMarks(keyed_by_file=True)
        self.gains.gained([PartitionInfo(TOPIC, p, None, None, 0, high)
                           for p, high in marks.items()])


def test_the_loop_marks_units_alone_only_for_files_written_after_the_gain():
    runner, group, submit = make(group=_KeyedGroup({0: 1, 1: 0}))
    put_file(group, b"A" * 16, "backlog.bin", [0])  # offsets 0, 1 on p0: 0 is backlog
    put_file(group, b"B" * 16, "new.bin", [1])  # offsets 0, 1 on p1: after the gain
    runner.step()
    by_name = {h.unit.files[0].rel_path: h.unit for h in submit.handles}
    assert set(by_name) == {"backlog.bin", "new.bin"}
    assert items_shared(by_name["backlog.bin"]) and not items_shared(by_name["new.bin"])
    assert all(is_shared(u) for u in by_name.values())  # their folders are checked


def test_a_group_not_keyed_by_file_checks_every_item_as_before():
    group = _KeyedGroup({0: 0, 1: 0})
    group.gains.keyed_by_file = False
    runner, group, submit = make(group=group)
    put_file(group, b"B" * 16, "new.bin", [1])
    runner.step()
    assert [items_shared(h.unit) for h in submit.handles] == [True]
