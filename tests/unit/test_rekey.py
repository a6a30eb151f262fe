"""``--rekey_by_file`` without a broker: the key, the origin headers, the book of
acknowledged copies, the purge floor, the first hop's driving (fake clients), the
option and the KafkaCrypto refusal."""

from __future__ import annotations

from collections import Counter

import argparse
import concurrent.futures
from pathlib import Path
from types import SimpleNamespace

import pytest

from girder_upload_stream import timings
from girder_upload_stream.cli.run import _run_parameters, add_run_arguments
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.wire.commit_metadata import format_metadata
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import RawMessage, Recorder
from girder_upload_stream.assembly.reassembly import Reassembler
from girder_upload_stream.loop.rekey_book import (AckBook, file_key_bytes, internal_group,
                                                  internal_topic, origin_headers, origin_of,
                                                  partition_for, place_of, purge_floors, raw_message,
                                                  route)
from girder_upload_stream.loop.rekey_hop import MAX_IN_FLIGHT, RekeyHop
from girder_upload_stream.loop.wiring import REKEY_CRYPTO_REFUSED, rekey_wanted
from girder_upload_stream.wire.codec import chunk_file, encode_chunk

T = "lab-files"


def _messages(data: bytes, name: str = "a.bin", subdir: str = "x") -> list[tuple[str, bytes]]:
    return [encode_chunk(chunk) for chunk in chunk_file(data, subdir, 8, filename=name)]


# -- the key ----------------------------------------------------------------------------
def test_every_chunk_of_one_file_generation_gets_one_key_and_one_partition():
    messages = _messages(b"0123456789" * 5)
    assert len(messages) > 3
    keys = {file_key_bytes(value) for _, value in messages}
    assert len(keys) == 1 and None not in keys
    [key] = keys
    assert {route(value, k.encode(), source, 8) for source, (k, value) in
            enumerate(messages)} == {(key, partition_for(place_of("x/a.bin"), 8))}


def test_every_generation_of_a_path_meets_in_one_partition_as_girder_names_it():
    """One member at a time uploads into an item (kafka/gain_marks.py): every production
    of a path, and paths Girder stores as one (it strips names), share a partition."""
    values = [_messages(b"first content")[0][1], _messages(b"other content")[0][1],
              _messages(b"first content", name=" a.bin ", subdir=" x")[0][1]]
    assert len({file_key_bytes(v) for v in values}) == 3
    assert len({route(v, None, 0, 64)[1] for v in values}) == 1
    spread = {route(_messages(b"c", name=f"f{i}.bin")[0][1], None, 0, 8)[1] for i in range(64)}
    assert spread == set(range(8))  # paths still spread over every partition


def test_another_generation_or_another_path_gets_another_key():
    first = file_key_bytes(_messages(b"first content")[0][1])
    again = file_key_bytes(_messages(b"other content")[0][1])
    elsewhere = file_key_bytes(_messages(b"first content", subdir="y")[0][1])
    assert len({first, again, elsewhere}) == 3


def test_partition_for_is_a_stable_hash_in_range_that_spreads_sequential_names():
    assert partition_for(b"x/a.bin", 4) == partition_for(b"x/a.bin", 4) == 2  # fixed for ever
    assert {partition_for(f"k{i}".encode(), 4) for i in range(100)} == {0, 1, 2, 3}
    counts = Counter(partition_for(f"run-{i % 5}/f{i:04d}.bin".encode(), 4) for i in range(120))
    assert max(counts.values()) <= 36, counts  # CRC-32 gave 36/36/24/24 here


@pytest.mark.parametrize("value", [b"\xc1junk", b"", None, b"\x93\x01\x02\x03"])
def test_a_message_that_names_no_file_is_forwarded_with_its_own_key(value):
    assert file_key_bytes(value) is None
    assert route(value, b"evil", 5, 4) == (b"evil", partition_for(b"evil", 4))
    assert route(value, None, 5, 4) == (None, 1)  # no key: its source partition


def test_names_say_what_they_are():
    assert internal_topic("t", "g") == "t--g--by-file"
    assert internal_group("g") == "g--by-file"


# -- the origin ------------------------------------------------------------------------
class _Msg:
    def __init__(self, topic, partition, offset, key, value, headers=None):
        self._v = (topic, partition, offset, key, value, headers)

    def topic(self): return self._v[0]
    def partition(self): return self._v[1]
    def offset(self): return self._v[2]
    def key(self): return self._v[3]
    def value(self): return self._v[4]
    def headers(self): return self._v[5]
    def error(self): return None


def test_origin_headers_round_trip_and_name_the_source():
    headers = origin_headers(T, 3, 41, b"a_chunk_1_of_2")
    msg = _Msg("inner", 0, 7, b"x/a.bin\x00ff", b"value", headers)
    raw = raw_message(msg)
    assert (raw.topic, raw.partition, raw.offset) == ("inner", 0, 7)  # its commits
    assert raw.key == b"a_chunk_1_of_2" and raw.origin == (T, 3, 41)
    assert raw.source == (T, 3, 41)
    no_key = origin_of(origin_headers(T, 1, 2, None))
    assert no_key is not None and no_key.key is None


@pytest.mark.parametrize("headers", [None, [], [("gus.source.topic", b"t")],
                                     [("gus.source.topic", b"t"),
                                      ("gus.source.partition", b"x"),
                                      ("gus.source.offset", b"1")]])
def test_messages_without_a_whole_origin_are_read_as_they_are(headers):
    raw = raw_message(_Msg("inner", 1, 2, b"k", b"v", headers))
    assert raw.origin is None and raw.source == ("inner", 1, 2) and raw.key == b"k"


class _Rejections(Recorder):
    def __init__(self):
        self.rejected = []

    def message_rejected(self, msg, error):
        self.rejected.append((msg.source, error.topic, error.partition, error.offset))


def test_a_rejected_re_keyed_message_is_named_by_its_source_and_committed_on_the_inner():
    recorder = _Rejections()
    processor = StreamProcessor(Reassembler("memory"), recorder=recorder)
    processor.handle(RawMessage("inner", 0, 5, b"evil", b"\xc1junk", (T, 2, 99)))
    assert recorder.rejected == [((T, 2, 99), T, 2, 99)]
    assert processor.offsets.committable() == {("inner", 0): 6}


def test_a_re_keyed_chunk_is_checked_against_its_original_key():
    key, value = _messages(b"0123456789abcdef")[0]
    processor = StreamProcessor(Reassembler("memory"), recorder=_Rejections())
    processor.handle(RawMessage("inner", 0, 0, key.encode(), value, (T, 1, 0)))
    assert processor.counters.messages_rejected == 0
    processor.handle(RawMessage("inner", 0, 1, b"x_other_chunk_1_of_2", value, (T, 1, 1)))
    assert processor.counters.messages_rejected == 1


# -- the book -------------------------------------------------------------------------
def test_acks_out_of_order_commit_only_below_the_first_unacknowledged():
    book, tp = AckBook(), (T, 0)
    for offset in range(10, 15):
        book.read(tp, offset)
    assert book.committable() == {tp: 10}  # nothing acknowledged: where it began
    for offset in (13, 11, 14):
        book.acked(tp, offset)
    assert book.committable() == {tp: 10}
    book.acked(tp, 10)
    assert book.committable() == {tp: 12}
    book.committed({tp: 12})
    assert book.committable() == {}
    book.acked(tp, 12)
    assert book.committable() == {tp: 15} and book.unacked == 0


def test_a_failed_delivery_blocks_the_commit_of_its_partition_only():
    book = AckBook()
    for offset in range(3):
        book.read((T, 0), offset)
        book.read((T, 1), offset)
    for offset in (0, 2):  # offset 1 of partition 0 failed: never acknowledged
        book.acked((T, 0), offset)
    for offset in range(3):
        book.acked((T, 1), offset)
    assert book.committable() == {(T, 0): 1, (T, 1): 3}
    assert book.committable([(T, 1)]) == {(T, 1): 3}
    book.forget([(T, 0)])
    assert book.committable() == {(T, 1): 3}


# -- the purge floor --------------------------------------------------------------------
def test_the_purge_floor_is_the_commit_or_the_lowest_retry_span_below_it():
    tp, other = ("inner", 0), ("inner", 1)
    with_retry = format_metadata(100, 80, [(85, 90)], [(20, 25), (40, 41)])
    plain = format_metadata(60, 60, [], [])
    accepted = {tp: (80, with_retry), other: (60, plain), ("inner", 2): (9, "")}
    assert purge_floors(accepted, [tp, other, ("inner", 2)]) == {
        tp: 20, other: 60, ("inner", 2): 9}
    assert purge_floors(accepted, [other]) == {other: 60}  # only what this member owns
    assert purge_floors({tp: 0}, [tp]) == {}
    assert purge_floors({tp: 30}, [tp]) == {tp: 30}


# -- the first hop, on fake clients -----------------------------------------------------
class _Group:
    def __init__(self, batches):
        self.batches, self.paused, self.commits = list(batches), [], []
        self.assignment = [(T, 0), (T, 1)]
        self.callbacks = {}
        self.closed = False

    def bind(self, **callbacks):
        self.callbacks = callbacks

    def pause(self, paused):
        self.paused.append(paused)

    def poll(self, n, timeout):
        assert timeout == 0  # the hop never waits: the second hop's poll does
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets):
        self.commits.append(dict(offsets))
        return offsets

    def caught_up(self):
        return not self.batches

    def close(self):
        self.closed = True


class _Producer:
    def __init__(self, room=10**9):
        self.room, self.queued, self.sent = room, [], []

    def send(self, key, value, partition, headers, on_delivered):
        if len(self.queued) >= self.room:
            raise BufferError
        self.queued.append((key, value, partition, headers, on_delivered))

    def deliver(self, n=None, error=None):
        for item in self.queued[:n]:
            self.sent.append(item)
            item[4](error)
        self.queued = self.queued[n:] if n is not None else []

    def poll(self):
        pass

    def flush(self, timeout):
        return len(self.queued)

    def close(self):
        return len(self.queued)


class _Purger:
    def __init__(self):
        self.calls = []

    def purge(self, floors):
        self.calls.append(dict(floors))

    def wait(self, timeout):
        pass


def _hop(batches, producer=None):
    group, producer = _Group(batches), producer or _Producer()
    hop = RekeyHop(group, producer, _Purger(), topic=T, group_id="g",
                   internal_topic="inner", partitions=4)
    return hop, group, producer


def test_copies_keep_their_value_and_carry_the_origin():
    key, value = _messages(b"0123456789abcdef")[0]
    hop, group, producer = _hop([[_Msg(T, 1, 7, key.encode(), value)]])
    assert hop.step() == 1
    [(internal_key, copied, partition, headers, _)] = producer.queued
    assert copied == value and internal_key == file_key_bytes(value)
    assert partition == partition_for(place_of("x/a.bin"), 4)
    assert origin_of(headers).key == key.encode() and origin_of(headers).offset == 7


def test_source_offsets_are_committed_only_once_acknowledged():
    hop, group, producer = _hop([[_Msg(T, 0, o, b"k", b"v") for o in range(4)]])
    hop.step()
    assert not hop.flush(0.1)  # nothing acknowledged yet: no source commit this round
    producer.deliver(2)
    hop.commit()
    assert group.commits == [{(T, 0): (2, "")}]
    producer.deliver(1, error="broker down")  # offset 2 failed: sent again, holds 3
    hop.step()
    producer.deliver()
    assert hop.flush(0.1)
    hop.commit()
    assert group.commits[-1] == {(T, 0): (4, "")}
    assert hop.failed_deliveries == 1 and hop.forwarded == 4
    assert [item[1] for item in producer.sent].count(b"v") == 5  # one sent twice


def test_a_full_producer_queue_pauses_the_hop_and_loses_nothing():
    batch = [_Msg(T, 0, o, b"k", b"v") for o in range(5)]
    hop, group, producer = _hop([batch], _Producer(room=2))
    hop.step()
    assert hop.blocked and len(producer.queued) == 2
    hop.step()
    assert group.paused[-1] is True  # no more reading while copies wait
    for _ in range(3):
        producer.deliver()
        hop.step()
    producer.deliver()
    assert not hop.blocked and hop.flush(0.1)
    hop.commit()
    assert group.commits[-1] == {(T, 0): (5, "")}
    assert hop.idle()


def test_too_many_unacknowledged_copies_pause_the_hop():
    hop, group, producer = _hop([[_Msg(T, 0, o, b"k", b"v") for o in range(MAX_IN_FLIGHT)]])
    hop.step()
    assert hop.blocked
    hop.step()
    assert group.paused[-1] is True
    producer.deliver()
    hop.step()
    assert group.paused[-1] is False


def test_a_revoke_flushes_and_commits_then_forgets():
    hop, group, producer = _hop([[_Msg(T, 1, o, b"k", b"v") for o in range(3)]])
    hop.step()
    producer.deliver()
    group.callbacks["on_revoke"]([(T, 1)])
    assert group.commits == [{(T, 1): (3, "")}]
    assert hop.book.committable() == {}


def test_the_purge_is_rate_limited_and_only_moves_forward():
    now = [0.0]
    hop = RekeyHop(_Group([]), _Producer(), _Purger(), topic=T, group_id="g",
                   internal_topic="inner", partitions=4, clock=lambda: now[0])
    with timings.overridden(rekey_purge_seconds=30.0):
        hop.purge({("inner", 0): 5})  # not in the first period of the run
        now[0] = 30.0
        hop.purge({("inner", 0): 10})
        now[0] = 40.0
        hop.purge({("inner", 0): 20})  # too soon
        now[0] = 61.0
        hop.purge({("inner", 0): 10, ("inner", 1): 4})  # only partition 1 moved
        now[0] = 100.0
        hop.purge({("inner", 0): 9})  # never backwards
    assert hop.purger.calls == [{("inner", 0): 10}, {("inner", 1): 4}]


def test_close_flushes_commits_and_leaves():
    hop, group, producer = _hop([[_Msg(T, 0, 0, b"k", b"v")]])
    hop.step()
    producer.deliver()
    hop.close()
    assert group.commits == [{(T, 0): (1, "")}] and group.closed


# -- the first hop as the checkpoint's upstream hop -------------------------------------
def test_the_runner_drives_the_hop_it_is_given_as_upstream_and_commits_it_at_its_checkpoint():
    """wiring._build gives the re-key hop as ``upstream=[hop]``: the runner steps it
    before its own poll, its checkpoint flushes and commits it (step 4), and the
    shutdown closes it after the second hop's group."""
    from girder_upload_stream.loop.runner import StreamRunner
    from tests.unit.fakes import FakeGroup, Submitter, run_settings
    hop, source, producer = _hop([[_Msg(T, 0, o, b"k", b"v") for o in range(3)]])
    inner = FakeGroup()
    runner = StreamRunner(run_settings(commit_interval_seconds=1000.0),
                          StreamProcessor(Reassembler()), inner, Submitter(), upstream=[hop])
    assert runner.rekey is hop
    runner.step()
    assert len(producer.queued) == 3 and source.commits == []
    runner.commit()  # nothing acknowledged yet: no source commit
    assert source.commits == []
    producer.deliver()
    runner.commit()
    assert source.commits == [{(T, 0): (3, "")}]
    runner.shutdown("test")
    assert inner.closed and source.closed


def test_the_checkpoint_purges_the_hop_no_higher_than_a_retry_span():
    """Step 7 hands the hop the second hop's accepted commit lowered to rule 9's lowest
    retry span (read in the commit's metadata): those records are read again by the
    next run."""
    from girder_upload_stream.ledger.offsets import OffsetTracker
    from girder_upload_stream.loop.checkpoint import Checkpoint
    inner_tp = ("inner", 0)
    tracker = OffsetTracker()
    tracker.assigned(inner_tp, None, None)
    for offset in range(100):
        tracker.read(inner_tp, offset)
    metadata = format_metadata(100, 80, [(85, 90)], [(20, 25), (40, 41)])

    class _InnerGroup:
        assignment = [inner_tp]

        def commit(self, offsets, sync=None):
            return {inner_tp: (80, metadata)}

    hop = RekeyHop(_Group([]), _Producer(), _Purger(), topic=T, group_id="g",
                   internal_topic="inner", partitions=4, clock=lambda: 1000.0)
    with timings.overridden(rekey_purge_seconds=0.0):
        Checkpoint(tracker, _InnerGroup(), upstream=[hop]).commit()
    assert hop.purger.calls == [{inner_tp: 20}]


# -- the option and the refusal -------------------------------------------------------
def _parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, default_config="test")
    return _run_parameters(parser.parse_args(["http://girder/api/v1", *argv]))


def test_the_option_is_off_by_default_and_a_switch():
    assert _parse()["rekey_by_file"] is False
    assert _parse("--rekey_by_file")["rekey_by_file"] is True


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.config"
    path.write_text("[broker]\nbootstrap.servers = localhost:9092\n" + text)
    return str(path)


def test_the_config_file_turns_it_on(tmp_path):
    assert rekey_wanted(_config(tmp_path, ""), False) is False
    assert rekey_wanted(_config(tmp_path, "[rekey_by_file]\nenabled = true\n"), False)
    assert rekey_wanted(_config(tmp_path, "[rekey_by_file]\nenabled = false\n"), True)
    with pytest.raises(ConfigError, match="enabled"):
        rekey_wanted(_config(tmp_path, "[rekey_by_file]\nenabled = maybe\n"), False)
    with pytest.raises(ConfigError, match="retention.ms"):
        rekey_wanted(_config(tmp_path, "[rekey_by_file]\nenabled = 1\nretention.ms = a\n"),
                     False)


@pytest.mark.parametrize("rekey_section, flag", [("", True),
                                                 ("[rekey_by_file]\nenabled = true\n", False)])
def test_kafkacrypto_configs_are_refused(tmp_path, rekey_section, flag):
    config = _config(tmp_path, "[kafkacrypto]\nnode_id = n\n" + rekey_section)
    with pytest.raises(ConfigError) as refused:
        rekey_wanted(config, flag)
    assert str(refused.value).startswith(REKEY_CRYPTO_REFUSED[:40])
    assert "\n" not in str(refused.value)
    assert rekey_wanted(_config(tmp_path, "[kafkacrypto]\nnode_id = n\n"), False) is False


# -- dead letters of a rejected file, read again from the internal topic -------------------
def test_a_rejected_files_dead_letters_name_the_source_and_carry_the_original_key():
    from tests.unit.test_dead_letter import FakeFetch, FakeProducer
    from girder_upload_stream.loop.dead_letter import HEADERS, DeadLetters
    internal = {("inner", 0, 5): (b"x/a.bin\x00ff", b"v1", origin_headers(T, 2, 40, b"a_1")),
                ("inner", 0, 6): (b"plain", b"v2", None)}
    producer = FakeProducer()
    letters = DeadLetters(producer, FakeFetch(internal), "g")
    letters.offsets([(("inner", 0), 5), (("inner", 0), 6)], "mismatched hash", "file_rejected",
                    "x/a.bin")
    assert letters.settle() is True
    sent = {value: (key, headers) for _, key, value, headers in producer.sent}
    key, headers = sent[b"v1"]
    assert key == b"a_1"
    assert (headers[HEADERS["topic"]], headers[HEADERS["partition"]],
            headers[HEADERS["offset"]]) == (T, "2", "40")
    key, headers = sent[b"v2"]  # no origin: where it was read
    assert key == b"plain" and headers[HEADERS["topic"]] == "inner"


def test_a_group_id_that_cannot_name_a_topic_is_refused_at_start(tmp_path):
    from girder_upload_stream.loop.wiring import rekey_plan
    from girder_upload_stream.settings import KafkaSettings
    config = _config(tmp_path, "[rekey_by_file]\nretention.ms = 1000\n")
    plan = rekey_plan(config, KafkaSettings(topic=T, group_id="g.1", consumer={}))
    assert (plan.internal_topic, plan.internal_group, plan.retention_ms) == (
        f"{T}--g.1--by-file", "g.1--by-file", 1000)
    assert "localhost:9092" not in repr(plan)  # the producer's settings stay out of repr
    with pytest.raises(ConfigError, match="cannot name the internal topic"):
        rekey_plan(config, KafkaSettings(topic=T, group_id="my group", consumer={}))


def test_a_poll_takes_no_more_large_messages_than_the_in_flight_bytes_allow():
    big = b"v" * (4 << 20)
    hop, group, producer = _hop([[_Msg(T, 0, 0, b"k", big)]])
    asked = []
    poll = group.poll
    group.poll = lambda n, timeout: asked.append(n) or poll(n, timeout)
    hop.step()
    hop.step()
    assert asked == [500, 6]  # 32 MiB less the 4 MiB (and its key) in flight, by 4 MiB


# -- the internal topic just created ----------------------------------------------------
class _Admin:
    """An admin client whose metadata shows the topic's partitions only from the
    ``shows_at``-th ``list_topics`` on (a broker whose metadata lags the creation)."""

    def __init__(self, shows_at: int, partitions: int = 4):
        self.shows_at, self.partitions, self.asked, self.created = shows_at, partitions, 0, []

    def create_topics(self, topics, operation_timeout=None):
        self.created += [t.topic for t in topics]
        done = concurrent.futures.Future()
        done.set_result(None)
        return {t.topic: done for t in topics}

    def list_topics(self, name, timeout=None):
        self.asked += 1
        parts = ({i: SimpleNamespace(id=i) for i in range(self.partitions)}
                 if self.asked >= self.shows_at else {})
        meta = SimpleNamespace(partitions=parts, error=None if parts else "LEADER_NOT_AVAILABLE")
        return SimpleNamespace(topics={name: meta})


@pytest.mark.parametrize("shows_at", [1, 3])
def test_a_created_topic_whose_partitions_show_late_is_waited_for(monkeypatch, shows_at):
    from girder_upload_stream.kafka import rekey as kafka_rekey
    admin = _Admin(shows_at)
    monkeypatch.setattr(kafka_rekey, "_admin", lambda settings: admin)
    monkeypatch.setattr(kafka_rekey, "_source_shape", lambda a, s, t: (4, 1, 1000))
    monkeypatch.setattr(kafka_rekey, "VISIBLE_POLL_SECONDS", 0.01)
    with timings.overridden(rekey_topic_visible_seconds=5.0):
        count, wanted = kafka_rekey.ensure_internal_topic({}, "src", "src--g--by-file", 1000)
    assert (count, wanted) == (4, 1000 + kafka_rekey.HEADER_ROOM)
    assert admin.created == ["src--g--by-file"] and admin.asked == shows_at


def test_a_created_topic_that_never_shows_stops_the_run_after_the_setting(monkeypatch):
    from girder_upload_stream.kafka import rekey as kafka_rekey
    from girder_upload_stream.kafka.errors import KafkaTerminalError
    now = [0.0]
    pauses: list[float] = []

    def pause(seconds):
        pauses.append(seconds)
        now[0] += seconds

    admin = _Admin(shows_at=10**9)
    with timings.overridden(rekey_topic_visible_seconds=1.0):
        assert kafka_rekey._visible_partitions(admin, "t", 1.0, clock=lambda: now[0],
                                               pause=pause) == 0
    assert now[0] == pytest.approx(1.0) and len(pauses) == 5, "bounded by the setting"
    monkeypatch.setattr(kafka_rekey, "_admin", lambda settings: _Admin(shows_at=10**9))
    monkeypatch.setattr(kafka_rekey, "_source_shape", lambda a, s, t: (4, 1, 1000))
    with timings.overridden(rekey_topic_visible_seconds=0.0):
        with pytest.raises(KafkaTerminalError, match="shows no partitions"):
            kafka_rekey.ensure_internal_topic({}, "src", "src--g--by-file", 1000)
