"""The first hop of ``--rekey_by_file``: read the source topic in the user's group and
re-produce every message, unchanged, to the internal topic keyed by its file.

Why: OpenMSIStream's producers key each chunk by path *and chunk number*, so a file's
chunks spread over every partition and the members of one group each see part of each
file. Re-keyed by file (path and sha512), all chunks of a file land in one partition of
``<topic>--<group>--by-file``, which the second hop (the consumer as it was, in the
group ``<group>--by-file``) reads and rebuilds whole: Kafka Streams' repartition
topics, Quix Streams' and Faust's ``group_by``.

**Commit order, and why at-least-once rather than a transaction.** A source offset is
committed only once the broker acknowledged every re-produced message below it (the
producer's flush and delivery reports, :class:`~girder_upload_stream.loop.rekey_book.AckBook`),
as Faust's ``_commit_tps`` does. A crash re-produces what was read after the last
commit: the second hop sees those chunks twice, which it already handles (a duplicate
chunk of a file being rebuilt costs nothing; a second copy of a file done is a second
production, recognised in Girder and skipped). A transaction per checkpoint
(``send_offsets_to_transaction``) would avoid the duplicates but needs a transactional
id per member that survives restarts and rebalances, ``read_committed`` on the second
hop, and aborts that hold the loop; it buys nothing the files do not have already.

**One thread.** The hop's consumer (a :class:`~girder_upload_stream.kafka.clients.ConsumerGroup`)
and producer (:class:`~girder_upload_stream.kafka.rekey.RekeyProducer`) are driven by
the run's loop: :meth:`RekeyHop.step` polls without waiting before the second hop
polls, and delivery reports are served there. So a stop request, SIGTERM, a Prefect
cancellation, ``--max_runtime_seconds`` and ``--max_idle_seconds`` stop both hops, and
the shutdown flushes and commits this one (:meth:`close`).

**Bounded.** At most :data:`MAX_IN_FLIGHT` messages (:data:`MAX_IN_FLIGHT_BYTES`) wait
for their acknowledgement; beyond, or when the producer's queue is full (BufferError),
the hop pauses fetching (it keeps polling, so its group membership lives) and what
was read but not queued waits, in order, for the next round.

**The checkpoint.** The hop is given to the second hop's runner as ``upstream=[hop]``
(loop/wiring.py): its :meth:`flush`, :meth:`commit` and :meth:`purge` are steps 4 and
7 of :class:`~girder_upload_stream.loop.checkpoint.Checkpoint`, the one place where the
order of a commit is written.

**Revoke.** Before partitions go, every re-produced message is flushed and the
acknowledged offsets committed synchronously (inside the rebalance callback).

No Kafka import here: the clients are given.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from girder_upload_stream import timings
from girder_upload_stream.loop.group_view import HopView, view_of_group
from girder_upload_stream.loop.rekey_book import AckBook, origin_headers, route

__all__ = ["RekeyHop", "MAX_IN_FLIGHT", "MAX_IN_FLIGHT_BYTES", "FLUSH_SECONDS"]

logger = logging.getLogger(__name__)

#: Re-produced messages waiting for the broker's acknowledgement, at most.
MAX_IN_FLIGHT = 5000
#: Their bytes, at most.
MAX_IN_FLIGHT_BYTES = 32 << 20
#: How long a commit round (or a revoke) waits for the acknowledgements; short of them,
#: no source offset is committed that round.
FLUSH_SECONDS = 2.0

TopicPartition = tuple[str, int]


@dataclass
class _Copy:
    """One source message on its way to the internal topic."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    partition: int
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"")


class RekeyHop:
    """The re-key hop of one member: ``group`` reads the source topic, ``producer``
    writes the internal topic of ``partitions`` partitions, ``purger`` deletes its
    records below the second hop's commits."""

    def __init__(self, group: Any, producer: Any, purger: Any, *, topic: str,
                 group_id: str, internal_topic: str, partitions: int,
                 poll_batch: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.group, self.producer, self.purger = group, producer, purger
        self.topic, self.group_id = topic, group_id
        self.internal_topic, self.partitions = internal_topic, partitions
        self.poll_batch, self._clock = poll_batch, clock
        self.book = AckBook()
        self._sent: dict[int, _Copy] = {}
        self._backlog: list[_Copy] = []  # read, not queued yet (queue full, or to resend)
        self._tokens = itertools.count()
        self._bytes = 0
        self._read, self._read_bytes = 0, 0  # messages read and their bytes, since start
        self._failing = False
        self._last_purge = clock()  # the first purge comes one period after the start
        self._purged: dict[TopicPartition, int] = {}
        self.forwarded = 0  # acknowledged by the broker, since start
        self.failed_deliveries = 0
        group.bind(on_revoke=self.on_revoke, on_lost=self.on_lost)

    # -- the loop's round ---------------------------------------------------------------
    def step(self) -> int:
        """Serve delivery reports, queue what waits, poll (never waiting) and re-produce;
        returns the messages read."""
        self.producer.poll()
        self._drain_backlog()
        self.group.pause(self.blocked)
        messages = self.group.poll(self._room(), timeout=0)
        for msg in messages:
            tp = (msg.topic(), msg.partition())
            key, value = msg.key(), msg.value()
            self._read += 1
            self._read_bytes += len(value or b"")
            internal_key, partition = route(value, key, tp[1], self.partitions)
            self.book.read(tp, msg.offset())
            self._backlog.append(_Copy(tp, msg.offset(), internal_key, value, partition,
                                       origin_headers(tp[0], tp[1], msg.offset(), key)))
        self._drain_backlog()
        return len(messages)

    def _room(self) -> int:
        """Messages one poll may take: ``poll_batch``, fewer when they are large, so
        that what waits for its acknowledgement stays near :data:`MAX_IN_FLIGHT_BYTES`
        (a poll while paused returns nothing: it serves the group's callbacks)."""
        if not self._read:
            return self.poll_batch
        average = max(1.0, self._read_bytes / self._read)
        free = MAX_IN_FLIGHT_BYTES - self._bytes
        return max(1, min(self.poll_batch, int(free // average)))

    @property
    def blocked(self) -> bool:
        """True while the hop must not read more (queue full, too much unacknowledged)."""
        return (bool(self._backlog) or len(self._sent) >= MAX_IN_FLIGHT
                or self._bytes >= MAX_IN_FLIGHT_BYTES)

    def _drain_backlog(self) -> None:
        while self._backlog:
            copy = self._backlog[0]
            token = next(self._tokens)
            try:
                self.producer.send(copy.key, copy.value, copy.partition, copy.headers,
                                   lambda error, token=token: self._delivered(token, error))
            except BufferError:
                return  # the producer's queue is full: the rest waits for the next round
            self._backlog.pop(0)
            self._sent[token] = copy
            self._bytes += copy.size

    def _delivered(self, token: int, error: str | None) -> None:
        copy = self._sent.pop(token, None)
        if copy is None:
            return
        self._bytes -= copy.size
        if error is None:
            self.book.acked(copy.tp, copy.offset)
            self.forwarded += 1
            if self._failing:
                logger.warning("the internal topic %s acknowledges again: source commits "
                               "resume", self.internal_topic)
                self._failing = False
            return
        self.failed_deliveries += 1
        if not self._failing:
            logger.error("a message re-keyed to %s was not acknowledged (%s): it is sent "
                         "again, and source offsets wait for it", self.internal_topic, error)
            self._failing = True
        self._backlog.append(copy)  # still unacknowledged in the book: it holds the commit

    # -- the checkpoint's part (an UpstreamHop of loop/checkpoint.py: steps 4 and 7) -----
    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Queue what waits and wait up to ``timeout`` s for the broker's answers; True
        when every message re-produced so far is acknowledged (False: commit nothing
        upstream this round)."""
        self._drain_backlog()
        left = self.producer.flush(timeout)
        return left == 0 and not self._backlog and not self._sent

    def commit(self, tps: list[TopicPartition] | None = None) -> None:
        """Commit the source offsets below which every message is acknowledged (for the
        partitions owned; asynchronous, synchronous inside a rebalance callback)."""
        offsets = self.book.committable(tps if tps is not None else self.group.assignment)
        if not offsets:
            return
        accepted = self.group.commit({tp: (offset, "") for tp, offset in offsets.items()})
        self.book.committed({tp: value[0] for tp, value in accepted.items()})

    def purge(self, accepted: dict[TopicPartition, int]) -> None:
        """Delete the internal topic's records below ``accepted`` (the second hop's
        commits the broker accepted, already lowered to rule 9's retry spans:
        :func:`~girder_upload_stream.loop.rekey_book.purge_floors`), at most every
        ``rekey_purge_seconds``; only where it moved since the last purge."""
        now = self._clock()
        if now - self._last_purge < timings.current().rekey_purge_seconds:
            return
        moved = {tp: offset for tp, offset in accepted.items()
                 if offset > self._purged.get(tp, 0)}
        if not moved:
            return
        self._last_purge = now
        self.purger.purge(moved)
        self._purged.update(moved)

    def view(self) -> HopView:
        """This member's partitions of the source topic and their lag."""
        return (view_of_group(self.group, "re-key")
                or HopView("re-key", self.topic, self.group_id, {}))

    # -- life cycle --------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing waits for an acknowledgement and the source topic is read to its end
        (a member given no partition of it has nothing to read)."""
        if self._sent or self._backlog:
            return False
        return not self.group.assignment or self.group.caught_up()

    def on_revoke(self, tps: list[TopicPartition]) -> None:
        """Before partitions go: flush, commit what is acknowledged (synchronously: this
        runs in the rebalance callback), then forget them."""
        if not self.flush():
            logger.warning("re-keyed messages not acknowledged before a rebalance: the "
                           "next owner of %s reads them again", tps)
        self.commit(tps)  # what was acknowledged (all of it, after a flush that worked)
        self._forget(tps)

    def on_lost(self, tps: list[TopicPartition]) -> None:
        """Partitions taken without a revoke: nothing is committed for them."""
        self._forget(tps)

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        self.book.forget(gone)
        self._backlog = [copy for copy in self._backlog if copy.tp not in gone]

    def close(self) -> None:
        """At shutdown: flush, commit, leave the group (its revoke commits once more)."""
        try:
            if self.flush():
                self.commit()
        finally:
            self.group.close()
            self.purger.wait(FLUSH_SECONDS)
            left = self.producer.close()
            if left:
                logger.warning("%d re-keyed message(s) were not acknowledged at shutdown: "
                               "their source offsets stay uncommitted", left)
