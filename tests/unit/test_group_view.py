"""What an operator sees of the group (loop/group_view.py, issue 23 §4): each hop's
partitions held by this member and their lag, from the consumer's cached positions and
high watermarks; its text in the progress line and its rows in the progress artifact."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from girder_upload_stream.kafka.clients import ConsumerGroup
from girder_upload_stream.ledger.stream_types import Counters
from girder_upload_stream.loop.group_view import (HopView, format_hop, format_hops, hop_rows,
                                                  hop_views, lag_by_partition, partition_list,
                                                  view_of_group)
from girder_upload_stream.loop.progress import format_progress, take_sample
from girder_upload_stream.prefect_glue import artifacts as A
from girder_upload_stream.registry.artifact_content import progress_description
from girder_upload_stream.registry.recording import RegistryRecorder
from tests.unit.fakes import Clock

# ---------------------------------------------------------------- the lag


def test_lag_is_high_watermark_minus_position_per_partition() -> None:
    assert lag_by_partition({2: (5, 20), 0: (10, 10)}) == {0: 0, 2: 15}


@pytest.mark.parametrize("position, high", [(-1001, 10), (-1, 10), (4, -1), (-1001, -1001)])
def test_lag_unknown_when_position_or_end_is(position, high) -> None:
    assert lag_by_partition({3: (position, high)}) == {3: None}


def test_a_position_past_the_cached_end_is_no_lag() -> None:
    # The cached high watermark is from the last fetch; the position may be newer.
    assert lag_by_partition({1: (12, 10)}) == {1: 0}


def test_total_lag_sums_the_known_ones() -> None:
    assert HopView("source", "t", "g", {0: 3, 1: None, 2: 4}).total_lag == 7
    assert HopView("source", "t", "g", {0: None}).total_lag is None
    assert HopView("source", "t", "g", {}).total_lag is None


# ---------------------------------------------------------------- the text


def test_a_hop_names_its_group_partitions_and_each_lag() -> None:
    view = HopView("by-file", "t--g--by-file", "g--by-file", {2: 15, 0: 0})
    assert format_hop(view) == "hop by-file: group g--by-file, partitions 0,2 lag 0/15"


def test_unknown_lag_and_no_partitions() -> None:
    assert format_hop(HopView("source", "t", "g", {0: None, 1: 1_234})) == \
        "hop source: group g, partitions 0,1 lag ?/1,234"
    assert format_hop(HopView("source", "t", "g", {})) == "hop source: group g, no partitions"


def test_many_partitions_give_ranges_the_total_and_the_most_behind() -> None:
    view = HopView("source", "t", "g", {p: p % 4 for p in range(16)} | {9: 40})
    assert format_hop(view) == "hop source: group g, partitions 0-15 lag 63 (most 40 on 9)"
    unknown = HopView("source", "t", "g", {p: None for p in range(10)})
    assert format_hop(unknown) == "hop source: group g, partitions 0-9 lag ?"


@pytest.mark.parametrize("partitions, text", [
    ([], ""), ([3], "3"), ([0, 1], "0,1"), ([0, 1, 2, 3, 5], "0-3,5"),
    ([7, 1, 2, 3, 9, 10, 11, 12], "1-3,7,9-12"), ([4, 4, 5], "4,5")])
def test_partition_list(partitions, text) -> None:
    assert partition_list(partitions) == text


def test_hops_are_joined_in_order() -> None:
    views = [HopView("re-key", "t", "g", {0: 1}), HopView("by-file", "t--g--by-file",
                                                          "g--by-file", {1: 2})]
    assert format_hops(views) == ("hop re-key: group g, partitions 0 lag 1; "
                                  "hop by-file: group g--by-file, partitions 1 lag 2")
    assert format_hops([]) == ""


def test_rows_one_per_hop_and_partition() -> None:
    views = [HopView("re-key", "t", "g", {1: 5, 0: None}), HopView("by-file", "x", "h", {})]
    assert hop_rows(views) == [
        {"hop": "re-key", "topic": "t", "group": "g", "partition": 0, "lag": None},
        {"hop": "re-key", "topic": "t", "group": "g", "partition": 1, "lag": 5},
        {"hop": "by-file", "topic": "x", "group": "h", "partition": None, "lag": None}]


# ---------------------------------------------------------------- collecting the hops


def _group(positions, topic: str = "t", group_id: str = "g") -> SimpleNamespace:
    method = positions if callable(positions) else (lambda: positions)
    return SimpleNamespace(topic=topic, group_id=group_id, partition_positions=method)


def test_view_of_a_group_is_named_after_its_topic() -> None:
    assert view_of_group(_group({0: (1, 3)})) == HopView("source", "t", "g", {0: 2})
    by_file = view_of_group(_group({}, "t--g--by-file", "g--by-file"))
    assert by_file == HopView("by-file", "t--g--by-file", "g--by-file", {})
    assert view_of_group(_group({}), name="upload").name == "upload"


def test_a_group_that_cannot_tell_has_no_view() -> None:
    def fails():
        raise KafkaException(KafkaError(KafkaError._STATE))
    assert view_of_group(_group(fails)) is None
    assert view_of_group(SimpleNamespace(lag=lambda: 3)) is None  # an older fake
    assert view_of_group(None) is None


class _Hop:
    def __init__(self, view) -> None:
        self._view = view

    def view(self):
        if isinstance(self._view, Exception):
            raise self._view
        return self._view


def test_the_rekey_hop_comes_first_then_the_group() -> None:
    rekey = HopView("re-key", "t", "g", {0: 4})
    second = _group({1: (0, 2)}, "t--g--by-file", "g--by-file")
    runner = SimpleNamespace(rekey=_Hop(rekey), group=second)
    assert hop_views(runner) == [rekey, HopView("by-file", "t--g--by-file", "g--by-file",
                                                {1: 2})]
    for broken in (RuntimeError("not joined"), "not a view"):
        assert hop_views(SimpleNamespace(rekey=_Hop(broken), group=second))[0].name == "by-file"
    assert hop_views(SimpleNamespace(rekey=None, group=_group({0: (0, 0)}))) == [
        HopView("source", "t", "g", {0: 0})]


# ---------------------------------------------------------------- the consumer group


class _Consumer:
    """librdkafka's consumer as partition_positions uses it: positions and cached ends."""

    def __init__(self, positions: dict[int, int], ends: dict[int, int]) -> None:
        self.positions, self.ends, self.cached = positions, ends, []

    def assignment(self):
        return [TopicPartition("t", p) for p in self.positions]

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, self.positions[tp.partition])
                for tp in partitions]

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        self.cached.append(cached)
        return 0, self.ends[partition.partition]


def test_the_consumer_group_reads_positions_from_librdkafkas_cache(monkeypatch) -> None:
    group = ConsumerGroup({"group.id": "lab"}, "t")
    consumer = _Consumer({0: 7, 1: -1001, 3: 2}, {0: 10, 1: 5, 3: -1})
    group._consumer = consumer
    group._read_up_to[("t", 1)] = 4  # read before librdkafka knows a position
    assert group.partition_positions() == {0: (7, 10), 1: (4, 5), 3: (2, -1)}
    assert consumer.cached == [True] * 3, "no broker round trip for the progress line"
    assert group.group_id == "lab"
    assert view_of_group(group) == HopView("source", "t", "lab", {0: 3, 1: 1, 3: None})
    assert group.lag() == 4, "the total lag is unchanged"
    assert ConsumerGroup({"group.id": "g"}, "t").partition_positions() == {}


# ---------------------------------------------------------------- progress line and artifact


def _runner(group, hops=()) -> SimpleNamespace:
    processor = SimpleNamespace(counters=Counters(files_uploaded=2), reassembler=SimpleNamespace(
        in_progress=lambda: []), offsets=SimpleNamespace(pending_count=lambda: 0))
    return SimpleNamespace(processor=processor, group=group, rekey=hops[0] if hops else None,
                           summary=None)


def test_the_progress_line_ends_with_the_hops() -> None:
    group = _group({0: (5, 5), 2: (0, 15)}, "t--g--by-file", "g--by-file")
    group.lag = lambda: 15
    sample = take_sample(_runner(group, [_Hop(HopView("re-key", "t", "g", {1: 0}))]), 3.0)
    line = format_progress(sample, None, 3.0)
    assert line.endswith("; lag 15 messages; rate not known yet; hop re-key: group g, "
                         "partitions 1 lag 0; hop by-file: group g--by-file, partitions "
                         "0,2 lag 0/15"), line


def test_the_progress_line_without_hops_is_as_before() -> None:
    sample = take_sample(_runner(SimpleNamespace(lag=lambda: 1)), 0.0)
    assert sample.hops == ()
    assert format_progress(sample, None, 0.0).endswith("lag 1 message; rate not known yet")


def test_progress_description_has_a_table_of_partitions() -> None:
    rows = hop_rows([HopView("source", "t", "g|x", {0: 1_500, 1: None})])
    text = progress_description("t", "g|x", {"messages_read": 3}, 1500, rows)
    lines = text.splitlines()
    assert lines[0].startswith("t by g|x: 3 message(s) read, 1,500 message(s) behind")
    assert "| hop | topic | group | partition | lag |" in lines
    assert "| source | t | g\\|x | 0 | 1,500 |" in lines
    assert "| source | t | g\\|x | 1 | unknown |" in lines
    assert progress_description("t", "g", {}, 1) == progress_description("t", "g", {}, 1, [])


class _Publish:
    def __init__(self) -> None:
        self.calls: list[A.Publication] = []

    def __call__(self, pub: A.Publication):
        self.calls.append(pub)
        return "id"


def test_the_progress_artifact_names_this_members_partitions(tmp_path: Path) -> None:
    publish, clock = _Publish(), Clock()
    publisher = A.ArtifactPublisher(RegistryRecorder(tmp_path / "LOGS", "t", "g"), "t", "g",
                                    publish=publish, active=lambda: True, clock=clock)
    positions = {0: (2, 4), 3: (9, 9)}
    group = _group(lambda: positions)
    group.lag = lambda: 2
    runner = _runner(group)
    publisher.tick(runner)
    first = publish.calls[-1]
    assert first.kind == "progress"
    assert "| source | t | g | 0 | 2 |" in first.description.splitlines()
    assert "| source | t | g | 3 | 0 |" in first.description.splitlines()
    positions[0] = (4, 4)  # caught up: the next update says so
    clock.now += A.PROGRESS_INTERVAL_SECONDS
    publisher.tick(runner)
    assert "| source | t | g | 0 | 0 |" in publish.calls[-1].description.splitlines()


def test_the_rekey_hop_shows_its_source_partitions() -> None:
    from girder_upload_stream.loop.rekey_hop import RekeyHop
    group = _group({0: (3, 9), 1: (-1001, 4)}, "t", "g")
    group.bind = lambda **callbacks: None
    hop = RekeyHop(group, producer=None, purger=None, topic="t", group_id="g",
                   internal_topic="t--g--by-file", partitions=2)
    assert hop.view() == HopView("re-key", "t", "g", {0: 6, 1: None})
    group.partition_positions = lambda: 1 / 0  # librdkafka cannot tell: no partitions shown
    assert hop.view() == HopView("re-key", "t", "g", {})
