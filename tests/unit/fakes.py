"""Fakes shared by the unit tests: a clock moved by hand, a fake topic, a spying
recorder, stream processors and runners driven without Kafka, Girder or Prefect."""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import (CompletedFile, FileOutcome, Outcome, RawMessage,
                                               Recorder, RejectedFile)
from girder_upload_stream.assembly.reassembly import Mode, Reassembler
from girder_upload_stream.loop.runner import StreamRunner
from girder_upload_stream.settings import RunSettings
from girder_upload_stream.wire.codec import Chunk
from girder_upload_stream.ledger.units import UploadUnit

__all__ = ["TOPIC", "PARTITIONS", "MiB", "Clock", "SpyRecorder", "Log", "encoded", "scatter",
           "make_processor", "outcomes", "upload_all", "content", "random_files",
           "lowest_offsets", "one_chunk", "FakeMsg", "FakeGroup", "Handle", "Submitter", "Job",
           "run_settings", "make_runner", "put_file"]

TOPIC = "t"
PARTITIONS = [(TOPIC, p) for p in range(4)]
MiB = 1 << 20


class Clock:
    """A clock the test moves by hand (``now``), or that moves by ``step`` at every
    reading (so loops that wait on it end)."""

    def __init__(self, now: float = 1000.0, step: float = 0.0) -> None:
        self.now, self.step = now, step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


class SpyRecorder(Recorder):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def chunk_added(self, chunk: Chunk, partition: int, offset: int) -> None:
        self.calls.append(("chunk_added", chunk.rel_path, chunk.chunk_i))

    def message_rejected(self, msg: RawMessage, error: ChunkDecodeError) -> None:
        self.calls.append(("message_rejected", msg.partition, msg.offset, error.reason))

    def file_rejected(self, rejected: RejectedFile) -> None:
        self.calls.append(("file_rejected", rejected.rel_path, rejected.reason))

    def file_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None:
        self.calls.append(("file_outcome", completed.rel_path, outcome.outcome))

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


class Log:
    """A fake topic: appends (key, value) pairs to partitions, handing out offsets."""

    def __init__(self) -> None:
        self.next = {tp: 0 for tp in PARTITIONS}

    def put(self, partition: int, key: bytes | str | None, value: bytes | None) -> RawMessage:
        tp = (TOPIC, partition)
        offset = self.next[tp]
        self.next[tp] += 1
        if isinstance(key, str):
            key = key.encode()
        return RawMessage(TOPIC, partition, offset, key, value)

    def end(self) -> dict:
        return {tp: n for tp, n in self.next.items() if n}


def encoded(data: bytes, name: str, subdir: str = "", size: int = 8) -> list[tuple[str, bytes]]:
    return [encode_chunk(c) for c in chunk_file(data, subdir, size, filename=name)]


def scatter(log: Log, files: dict[str, bytes], rng: random.Random, size: int = 8,
            duplicates: int = 0) -> list[RawMessage]:
    """Every chunk of every file (plus some duplicates) on random partitions, shuffled;
    returned in a delivery order that interleaves partitions but keeps each in order."""
    pairs = [pair for rel, data in files.items()
             for pair in encoded(data, rel.rpartition("/")[2], rel.rpartition("/")[0], size)]
    pairs += rng.sample(pairs, duplicates)
    rng.shuffle(pairs)
    return [log.put(rng.randrange(4), key, value) for key, value in pairs]


def make_processor(mode: Mode = Mode.MEMORY, out: Path | None = None,
                   **kwargs) -> StreamProcessor:
    kwargs.setdefault("recorder", SpyRecorder())
    kwargs.setdefault("clock", Clock())
    return StreamProcessor(Reassembler(mode, out), **kwargs)


def outcomes(unit: UploadUnit, outcome: Outcome = Outcome.UPLOADED) -> list[FileOutcome]:
    return [FileOutcome(f.rel_path, (f.rel_path, f.file_hash), outcome) for f in unit.files]


def upload_all(proc: StreamProcessor, outcome: Outcome = Outcome.UPLOADED) -> list[UploadUnit]:
    units = proc.take_units()
    for unit in units:
        proc.finish_unit(unit, outcomes(unit, outcome))
    return units


def content(f: CompletedFile) -> bytes:
    return f.data if f.data is not None else f.path.read_bytes()


def random_files(rng: random.Random, n: int) -> dict[str, bytes]:
    return {f"{'sub/' if i % 3 else ''}file{i}.bin": rng.randbytes(rng.randint(1, 60))
            for i in range(n)}


def lowest_offsets(messages: list[RawMessage]) -> dict:
    lowest: dict = {}
    for m in messages:
        tp = (m.topic, m.partition)
        lowest[tp] = min(lowest.get(tp, m.offset), m.offset)
    return lowest


def one_chunk(log: Log, partition: int, data: bytes, name: str) -> RawMessage:
    [(key, value)] = encoded(data, name, size=len(data))
    return log.put(partition, key, value)


class FakeMsg:
    def __init__(self, partition: int, offset: int, key: bytes | None,
                 value: bytes | None) -> None:
        self._p, self._o, self._k, self._v = partition, offset, key, value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v


class FakeGroup:
    """Delivers queued messages (none while paused), records commits, pauses, closes."""

    def __init__(self, n_partitions: int = 4) -> None:
        self.assignment = [(TOPIC, p) for p in range(n_partitions)]
        self.queue: deque[FakeMsg] = deque()
        self.next = {p: 0 for p in range(n_partitions)}
        self.commits: list[dict] = []
        self.syncs: list[bool] = []
        self.committed: dict = {}
        self.metadata: dict = {}
        self.pauses: list[bool] = []
        self.paused = False
        self.closed = False
        self.polls = 0
        self.on_poll = None  # called at every poll (to script events)

    def put(self, partition: int, key: str | bytes | None, value: bytes | None) -> FakeMsg:
        msg = FakeMsg(partition, self.next[partition],
                      key.encode() if isinstance(key, str) else key, value)
        self.next[partition] += 1
        self.queue.append(msg)
        return msg

    def poll(self, max_messages: int, timeout: float = 0.2) -> list[FakeMsg]:
        assert not self.closed
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self)
        if self.paused:
            return []
        n = min(max_messages, len(self.queue))
        return [self.queue.popleft() for _ in range(n)]

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self.pauses.append(paused)

    def commit(self, offsets: dict, sync: bool | None = None) -> dict:
        """Takes ``{tp: (offset, metadata)}`` as the real group; records offsets only
        (``metadata`` keeps the last metadata per partition, ``syncs`` whether each
        commit was synchronous)."""
        self.syncs.append(bool(sync))
        plain = {tp: offset for tp, (offset, _) in offsets.items()}
        self.metadata.update({tp: md for tp, (_, md) in offsets.items()})
        self.commits.append(plain)
        self.committed.update(plain)
        return dict(offsets)

    def close(self) -> None:
        self.closed = True


class Handle:
    """An upload task the test finishes (or crashes) when it likes."""

    def __init__(self, unit: UploadUnit) -> None:
        self.unit = unit
        self._done = False
        self._outcomes: list[FileOutcome] = []
        self._error: BaseException | None = None
        self.done_after: int | None = None  # polls of done() before it reports done

    def finish(self, outcome: Outcome = Outcome.UPLOADED) -> None:
        self._outcomes = [FileOutcome(f.rel_path, (f.rel_path, f.file_hash), outcome)
                          for f in self.unit.files]
        self._done = True

    def crash(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def done(self) -> bool:
        if self.done_after is not None:
            self.done_after -= 1
            if self.done_after <= 0:
                self.finish()
        return self._done

    def result(self) -> list[FileOutcome]:
        assert self._done, "result() called on a running task"
        if self._error is not None:
            raise self._error
        return self._outcomes


class Submitter:
    def __init__(self, auto: Outcome | None = None) -> None:
        self.handles: list[Handle] = []
        self.auto = auto

    def __call__(self, unit: UploadUnit) -> Handle:
        handle = Handle(unit)
        if self.auto is not None:
            handle.finish(self.auto)
        self.handles.append(handle)
        return handle

    def files(self) -> list[str]:
        return [f.rel_path for h in self.handles for f in h.unit.files]


class Job:
    def __init__(self) -> None:
        self.ticks: list[bool] = []

    def tick(self, runner, final: bool = False) -> None:
        self.ticks.append(final)


def run_settings(**overrides) -> RunSettings:
    base = {"commit_interval_seconds": 0.0, "poll_batch": 100, "interactive": False,
            "retry_delay_seconds": 5.0, "max_unit_files": 1}
    return RunSettings(**{**base, **overrides})


def make_runner(group: FakeGroup | None = None, submit: Submitter | None = None,
         clock: Clock | None = None, jobs: list | None = None, **overrides):
    run = run_settings(**overrides)
    clock = clock or Clock(now=100.0)
    processor = StreamProcessor(Reassembler(), max_unit_files=run.max_unit_files,
                                max_unit_bytes=run.max_unit_bytes,
                                retry_delay=run.retry_delay_seconds, clock=clock)
    group = group or FakeGroup()
    submit = submit or Submitter()
    return StreamRunner(run, processor, group, submit, jobs, clock=clock), group, submit


def put_file(group: FakeGroup, data: bytes, name: str, partitions: list[int],
             size: int = 8, skip: set[int] = frozenset()) -> list:
    """Queue a file's chunks, chunk i on partitions[i % len]; chunk numbers in ``skip``
    are returned (key, value, partition) instead of queued."""
    held = []
    for i, chunk in enumerate(chunk_file(data, "", size, filename=name)):
        key, value = encode_chunk(chunk)
        partition = partitions[i % len(partitions)]
        if chunk.chunk_i in skip:
            held.append((partition, key, value))
        else:
            group.put(partition, key, value)
    return held
