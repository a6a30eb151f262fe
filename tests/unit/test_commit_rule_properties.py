"""Property-based tests of the commit rule: any interleaving of chunks, completions,
upload outcomes, revokes, lost partitions, restarts and crashes keeps it.

A small simulated world: a topic of 3 partitions that files are produced to (chunks in
any order, duplicates, garbage, and competing copies: forged chunks with other bytes,
whole copies failing the sha512, the file cut with another chunk size), a Girder that is a set of file keys, and one consumer
(a :class:`StreamProcessor`) driven the way the runner drives it. After every commit:

* nothing committed before it is durable: every message below the high watermark
  outside the pending and retry spans of the commit metadata belongs to a file in
  Girder, or to a file rejected for good (bad chunks), or can never be a file;

and at the end, once every file is produced whole and every upload succeeds:

* nothing is held for ever that is not waiting for a message: every offset is
  committed to the end of its partition and nothing is in flight;
* nothing is lost: after one more restart (which retries the files whose upload
  failed for good), every file is in Girder.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from girder_upload_stream.wire.codec import chunk_file, decode_chunk, encode_chunk
from girder_upload_stream.ledger.offsets import parse_failed, parse_metadata, parse_spans
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import (FileOutcome, Outcome, PartitionInfo, RawMessage,
                                               Recorder)
from girder_upload_stream.assembly.reassembly import Reassembler

TOPIC = "t"
N_PARTITIONS = 3
FILES = {f"{'d/' if i % 2 else ''}f{i}.bin": hashlib.sha256(bytes([i])).digest()[: 5 + 7 * i]
         for i in range(4)}
CHUNKS = {rel: [encode_chunk(c) for c in chunk_file(data, rel.rpartition("/")[0], 8,
                                                      filename=rel.rpartition("/")[2])]
          for rel, data in FILES.items()}
KEYS = {rel: decode_chunk(CHUNKS[rel][0][1]).file_key for rel in FILES}
GARBAGE = (b"junk", b"\xc1 not msgpack")


def _forge(pair: tuple[str, bytes]) -> tuple[str, bytes]:
    """The same chunk (name, file hash, number, offset, size) with other bytes: a valid
    message whose chunk hash matches its bytes, but whose file can never verify."""
    chunk = decode_chunk(pair[1])
    data = bytes(b ^ 0x5A for b in chunk.data)
    return encode_chunk(replace(chunk, data=data, chunk_hash=hashlib.sha512(data).digest()))


#: Competing copies (issue 20 section 1): each chunk of each file with other bytes, and
#: each file cut with another chunk size (another chunk count for all but the smallest).
FORGED = {rel: [_forge(pair) for pair in pairs] for rel, pairs in CHUNKS.items()}
RECHUNKED = {rel: [encode_chunk(c) for c in chunk_file(data, rel.rpartition("/")[0], 5,
                                                         filename=rel.rpartition("/")[2])]
             for rel, data in FILES.items()}


class Registry(Recorder):
    """The registries as a restart reads them: processed and failed files."""

    def __init__(self) -> None:
        self.processed: set[tuple[str, str]] = set()
        self.failed: set = set()
        self.failed_uploads: set = set()

    def file_outcome(self, completed, outcome: FileOutcome) -> None:
        if outcome.outcome is Outcome.FAILED_TERMINAL:
            self.failed_uploads.add(completed.file_key)
        elif outcome.outcome.durable:
            self.processed.add((completed.rel_path, completed.file_hash.hex()[:32]))

    def file_found(self, progress) -> None:
        self.processed.add((progress.rel_path, progress.file_hash_hex[:32]))

    def file_rejected(self, rejected) -> None:
        self.failed.add((rejected.rel_path, rejected.file_hash))


class World:
    def __init__(self, bound: int | None = None) -> None:
        self.bound = bound  # --max_files_in_progress (None: no bound)
        self.log: list[list[tuple[bytes, bytes]]] = [[] for _ in range(N_PARTITIONS)]
        self.committed: dict[int, tuple[int, str]] = {}
        self.girder: set = set()
        self.registry = Registry()
        self.units: list = []
        self.start()

    def start(self) -> None:
        """A (re)started consumer: reads every partition again from its commit."""
        self.proc = StreamProcessor(Reassembler(), recorder=self.registry,
                                    known_done=set(self.registry.processed),
                                    max_inflight_units=2, max_unit_files=2, retry_delay=0.0,
                                    max_files_in_progress=self.bound)
        self.units = []
        self.pos = [self.committed.get(p, (0, None))[0] for p in range(N_PARTITIONS)]
        self.proc.assigned([PartitionInfo(TOPIC, p, *self.committed.get(p, (None, None)), 0)
                            for p in range(N_PARTITIONS)])

    # -- events ----------------------------------------------------------------------
    def produce(self, rel: str, chunk: int, partition: int) -> None:
        pairs = CHUNKS[rel]
        key, value = pairs[chunk % len(pairs)]
        self.log[partition].append((key.encode(), value))

    def produce_file(self, rel: str, partition: int) -> None:
        for i in range(len(CHUNKS[rel])):
            self.produce(rel, i, (partition + i) % N_PARTITIONS)

    def forge(self, rel: str, chunk: int, partition: int) -> None:
        """One chunk of ``rel`` with other bytes (a forged or corrupted chunk)."""
        key, value = FORGED[rel][chunk % len(FORGED[rel])]
        self.log[partition].append((key.encode(), value))

    def bad_copy(self, rel: str, chunk: int, partition: int) -> None:
        """A whole copy of ``rel`` whose chunk ``chunk`` has other bytes: it fails the
        sha512, spread over the partitions (any order against the clean copies)."""
        bad = chunk % len(CHUNKS[rel])
        for i, pair in enumerate(CHUNKS[rel]):
            key, value = FORGED[rel][i] if i == bad else pair
            self.log[(partition + i) % N_PARTITIONS].append((key.encode(), value))

    def rechunk(self, rel: str, partition: int) -> None:
        """``rel`` produced whole again with another chunk size (a second chunking)."""
        for i, (key, value) in enumerate(RECHUNKED[rel]):
            self.log[(partition + i) % N_PARTITIONS].append((key.encode(), value))

    def deliver_all(self) -> None:
        for p in range(N_PARTITIONS):
            while self.pos[p] < len(self.log[p]):
                self.deliver(p)

    def deliver(self, partition: int) -> None:
        if self.pos[partition] < len(self.log[partition]):
            key, value = self.log[partition][self.pos[partition]]
            self.proc.handle(RawMessage(TOPIC, partition, self.pos[partition], key, value))
            self.pos[partition] += 1
            self.seek()

    def seek(self) -> None:
        """What the runner does after each batch: the seeks the tracker asks for (over
        done spans, rule 8; back to failed files, rule 9; back to chunks put off at the
        bound of files in progress, rule 10), from the next delivery on."""
        for (_, p), offset in self.proc.offsets.take_seeks().items():
            self.pos[p] = offset
            self.proc.offsets.sought((TOPIC, p), offset)

    def take(self) -> None:
        self.units += self.proc.take_units()
        for key in self.proc.take_probes():
            self.proc.probe_result(key, key in self.girder)

    def finish(self, index: int, outcome: Outcome) -> None:
        if not self.units:
            return
        unit = self.units.pop(index % len(self.units))
        if outcome.durable and outcome is not Outcome.FAILED_TERMINAL:
            self.girder.update(f.file_key for f in unit.files)
        self.proc.finish_unit(unit, [FileOutcome(f.rel_path, f.file_key, outcome)
                                     for f in unit.files])

    def commit(self, partitions=None) -> None:
        tps = None if partitions is None else [(TOPIC, p) for p in partitions]
        plan = self.proc.offsets.commit_plan(tps)
        for (_, p), (offset, metadata) in plan.items():
            self.check_durable(p, offset, metadata)
            self.committed[p] = (offset, metadata)
        self.proc.offsets.committed(plan)

    def revoke(self, partition: int, lost: bool) -> None:
        """A rebalance takes a partition away (committing first, unless it was lost)
        and gives it back at once: it is read again from its commit."""
        tp = (TOPIC, partition)
        if not lost:
            self.commit([partition])
        self.proc.hand_over([tp])
        self.proc.offsets.forget([tp])
        self.pos[partition] = self.committed.get(partition, (0, None))[0]
        self.proc.assigned([PartitionInfo(TOPIC, partition,
                                          *self.committed.get(partition, (None, None)), 0)])

    def crash(self, uploads_landed: bool) -> None:
        """kill -9: units in flight may or may not have reached Girder."""
        if uploads_landed:
            self.girder.update(f.file_key for u in self.units for f in u.files)
        self.start()

    # -- the rule ----------------------------------------------------------------------
    def check_durable(self, partition: int, committed: int, metadata: str) -> None:
        high = parse_metadata(metadata)
        spans = parse_spans(metadata, committed) or []
        pending = {o for a, b in spans + parse_failed(metadata) for o in range(a, b)}
        done = [o for o in range(high) if o not in pending]
        for offset in done:
            key, value = self.log[partition][offset]
            if value in GARBAGE:
                continue
            file_key = decode_chunk(value).file_key
            assert file_key in self.girder or file_key in self.registry.failed, (
                f"p{partition}@{offset} ({file_key[0]}) committed before it is durable")

    def drain(self, produce: bool = True) -> None:
        self.commit()  # what the run reached, before the files are produced once more
        for rel, pairs in CHUNKS.items():  # every file produced whole at last
            for i in range(len(pairs) if produce else 0):
                self.produce(rel, i, i % N_PARTITIONS)
        for _ in range(200):
            self.deliver_all()
            self.take()
            while self.units:
                self.finish(0, Outcome.UPLOADED)
            self.commit()
            read_all = all(self.pos[p] >= len(self.log[p]) for p in range(N_PARTITIONS))
            if self.proc.idle and not self.units and not self.proc.ledger.lookups_wanted \
                    and read_all:  # a seek back (rules 9, 10) leaves messages to read
                break


event = st.one_of(
    st.tuples(st.just("produce"), st.sampled_from(sorted(FILES)), st.integers(0, 3),
              st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("produce_file"), st.sampled_from(sorted(FILES)),
              st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("garbage"), st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("forge"), st.sampled_from(sorted(FILES)), st.integers(0, 3),
              st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("bad_copy"), st.sampled_from(sorted(FILES)), st.integers(0, 3),
              st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("rechunk"), st.sampled_from(sorted(FILES)),
              st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("deliver_all")),
    st.tuples(st.just("deliver"), st.integers(0, N_PARTITIONS - 1)),
    st.tuples(st.just("take")),
    st.tuples(st.just("finish"), st.integers(0, 3), st.sampled_from(list(Outcome))),
    st.tuples(st.just("commit")),
    st.tuples(st.just("revoke"), st.integers(0, N_PARTITIONS - 1), st.booleans()),
    st.tuples(st.just("crash"), st.booleans()),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, max_size=60))
def test_any_interleaving_keeps_the_commit_rule(events) -> None:
    _play(World(), events)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, max_size=60), st.integers(1, 2))
def test_any_interleaving_keeps_the_commit_rule_at_the_bound_of_files_in_progress(
        events, bound) -> None:
    """With --max_files_in_progress 1 or 2 (4 files): chunks beyond the bound wait
    (offsets rule 10), are never committed past, and every file lands in the end."""
    _play(World(bound), events)


def _play(world: World, events) -> None:
    for name, *args in events:
        if name == "garbage":
            world.log[args[0]].append(GARBAGE)
        else:
            getattr(world, name)(*args)
    world.drain()
    for p in range(N_PARTITIONS):
        if world.log[p]:
            assert world.committed[p][0] == len(world.log[p]), f"p{p} held: {world.committed}"
    assert world.proc.idle and world.proc.offsets.pending_count() == 0
    # A file whose upload failed for good is retried by the next run: with Girder
    # accepting it now, a restart that reads nothing new puts every file there.
    world.crash(uploads_landed=False)
    world.drain(produce=False)
    for rel, key in KEYS.items():
        assert key in world.girder, f"{rel} lost"
