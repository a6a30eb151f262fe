"""The checkpoint: the one place that decides what is committed, and in which order.

Quix Streams gives its ``Checkpoint`` the same job (flush the sinks and the producer,
then commit, then make the state durable): the steps that make an offset safe to
commit are a sequence, and a sequence written in several modules drifts. Here the
rules of *which* offsets are safe stay in :mod:`girder_upload_stream.ledger.offsets`
(rules 1-9, pure) and the book of asynchronous commits in
:mod:`girder_upload_stream.kafka.commits`; this module only orders the steps. It
imports no Kafka module: the consumer group is given to it (the interface of
:class:`CommitGroup`), and so are the upstream hops (:class:`UpstreamHop`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from girder_upload_stream import failpoints
from girder_upload_stream.ledger.offsets import OffsetTracker, TopicPartition
from girder_upload_stream.loop.rekey_book import purge_floors

__all__ = ["Checkpoint", "CommitGroup", "UpstreamHop", "Plan"]

logger = logging.getLogger(__name__)

Plan = dict[TopicPartition, tuple[int, str]]  # {tp: (offset, metadata)}


class CommitGroup(Protocol):
    """What the checkpoint needs of a consumer group
    (:class:`~girder_upload_stream.kafka.clients.ConsumerGroup`). A group may also have
    ``clamp(plan) -> plan`` (an encrypted topic's: the plan stopped before the messages
    not decrypted yet); without it the plan goes out as it is."""

    @property
    def assignment(self) -> list[TopicPartition]: ...

    def commit(self, offsets: Plan, sync: bool | None = None) -> Plan: ...


class UpstreamHop(Protocol):
    """A hop before this one in the same run (the re-key hop: it reads the source topic
    and re-produces each chunk to the internal topic this hop reads)."""

    def flush(self, timeout: float) -> bool:
        """True once everything it re-produced is acknowledged by the broker."""

    def commit(self, tps: list[TopicPartition] | None = None) -> None:
        """Commit its own consumer's offsets (all of its partitions when ``tps`` is None)."""

    def purge(self, accepted: dict[TopicPartition, int]) -> None:
        """Per partition of this hop, the offset below which what the upstream hop
        re-produced is needed no more: this hop's commit the broker accepted, lowered to
        the start of its lowest retry span (offsets rule 9: the next run reads those
        messages again)."""


class Checkpoint:
    """Owns the commit of one run. What must be durable before an offset is committed,
    in this order:

    1. **the plan**, per owned partition (the group's assignment, or the partitions
       being revoked): :meth:`OffsetTracker.commit_plan` by the offsets rules 1-9 (the
       lowest pending offset or one past the last read, with the metadata of rules
       7-9), nothing for a partition where neither moved since the last commit; then
       clamped by the group's decrypting reader on an encrypted topic: no offset passes
       a message still held (not decrypted yet), which the metadata lists as pending;
    2. **the dead letters acknowledged** (``--dead_letter_topic``,
       :mod:`~girder_upload_stream.loop.dead_letter`): every message rejected so far was
       produced to the dead-letter topic and the broker acknowledged it; if one is not,
       nothing is committed this round and it is sent again next round;
    3. **the registry save** (rule 5): every file whose messages the plan passes is
       listed as processed or failed on disk first. If it fails (a full disk...)
       nothing is committed; uploads go on and the next round tries again;
    4. **the upstream hops flushed and committed** (the loop's rounds only): each hop's
       re-produced messages acknowledged (``flush``), then its own offsets committed;
       a hop whose flush fails skips its commit this round, without holding this hop's;
    5. **this hop's commit**: asynchronous from the loop (the broker's answer is served
       by a later poll, :mod:`girder_upload_stream.kafka.commits`), synchronous inside
       a rebalance callback (the revoked partitions must not go before it);
    6. **what the broker accepted fed back to the tracker**
       (:meth:`OffsetTracker.committed`: the clamped values, what was really
       committed), so it is not committed again (a held message decrypted later lies
       below them and holds the next commits like any pending one);
    7. **the upstream purge**: after an accepted commit, every upstream hop hears this
       hop's accepted offsets of the owned partitions, each lowered to the start of its
       lowest retry span (rule 9, read in the commit's metadata:
       :func:`~girder_upload_stream.loop.rekey_book.purge_floors`): what it re-produced
       below them is read by nobody any more.

    Steps 2-4 run when there is something to commit: a plan, or upstream hops. A
    failure of step 2 or 3 (False, or an exception: logged once per streak) leaves
    everything uncommitted, upstream hops included; a failure of step 4 only the hop's.
    """

    def __init__(self, tracker: OffsetTracker, group: CommitGroup, *,
                 dead_letters: Callable[[], bool] | None = None,
                 save: Callable[[], bool] | None = None,
                 upstream: Sequence[UpstreamHop] = (),
                 flush_seconds: float = 2.0) -> None:
        self.tracker, self.group = tracker, group
        self._durable_steps = [step for step in (dead_letters, save) if step is not None]
        self.upstream = list(upstream)
        self.flush_seconds = flush_seconds
        self._durable_failing = False  # steps 2-3 raised last time (logged once)
        self._unflushed: set[int] = set()  # id() of hops whose last flush failed

    # -- the two ways in --------------------------------------------------------------
    def commit(self) -> None:
        """A round of the loop (and the last one at shutdown): steps 1-7 for every
        partition owned, asynchronously."""
        self._run(self.group.assignment, sync=False, upstream=self.upstream)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Inside a rebalance callback, before ``tps`` go: steps 1-3 and 5-7 for them,
        synchronously. The upstream hops' partitions are not revoked (their own
        consumer's rebalances commit for them), so step 4 waits for the next round."""
        self._run(list(tps), sync=True, upstream=[])

    # -- the sequence -----------------------------------------------------------------
    def _run(self, owned: list[TopicPartition], sync: bool,
             upstream: list[UpstreamHop]) -> None:
        plan = self.plan(owned)                                          # 1
        if not plan and not upstream:
            return
        if not self._durable():                                          # 2, 3
            return
        for hop in upstream:                                             # 4
            if self._flushed(hop):
                self._commit_upstream(hop)
        if not plan:
            return
        failpoints.hit("commit.before")
        accepted = self.group.commit(plan, sync=True) if sync else self.group.commit(plan)  # 5
        self.tracker.committed(accepted)                                 # 6
        failpoints.hit("commit.after")
        self._purge(accepted, owned)                                     # 7

    def plan(self, owned: list[TopicPartition]) -> Plan:
        """Step 1: the tracker's plan for ``owned``, clamped by held messages."""
        plan = self.tracker.commit_plan(owned)
        clamp = getattr(self.group, "clamp", None)
        return clamp(plan) if plan and clamp is not None else plan

    def _durable(self) -> bool:
        """Steps 2 and 3: False if one returned False (it logs why itself, e.g.
        :meth:`RegistryRecorder.try_save`) or raised (logged here, once per streak)."""
        try:
            ok = all(step() is not False for step in self._durable_steps)
        except Exception as exc:  # noqa: BLE001 - a failing save must not stop uploads
            if not self._durable_failing:
                logger.error("offsets are not committed while the save before a commit "
                             "fails (%s: %s); uploads go on, commits resume once it works",
                             type(exc).__name__, exc)
            self._durable_failing = True
            return False
        if ok and self._durable_failing:
            logger.warning("the save before a commit works again: offset commits resume")
            self._durable_failing = False
        return ok

    def _flushed(self, hop: UpstreamHop) -> bool:
        """Step 4's condition: the hop's re-produced messages are acknowledged (a
        failure is logged at the first round of a streak and when it ends)."""
        try:
            ok = bool(hop.flush(self.flush_seconds))
        except Exception as exc:  # noqa: BLE001 - its commit waits, this hop's does not
            logger.warning("%s: flush failed (%s: %s)", type(hop).__name__,
                           type(exc).__name__, exc)
            ok = False
        if not ok and id(hop) not in self._unflushed:
            logger.warning("%s: re-produced messages not acknowledged within %gs; its "
                           "offsets are not committed until they are", type(hop).__name__,
                           self.flush_seconds)
            self._unflushed.add(id(hop))
        elif ok and id(hop) in self._unflushed:
            logger.info("%s: re-produced messages acknowledged again; its commits resume",
                        type(hop).__name__)
            self._unflushed.discard(id(hop))
        return ok

    @staticmethod
    def _commit_upstream(hop: UpstreamHop) -> None:
        try:
            hop.commit()
        except Exception as exc:  # noqa: BLE001 - its offsets stay; next round commits
            logger.warning("%s: commit failed (%s: %s)", type(hop).__name__,
                           type(exc).__name__, exc)

    def _purge(self, accepted: Plan, owned: list[TopicPartition]) -> None:
        """Step 7: the upstream hops hear the accepted offsets of owned partitions,
        never above a retry span (rule 9) the commit's metadata names."""
        offsets = purge_floors(accepted, owned)
        if not offsets:
            return
        for hop in self.upstream:
            try:
                hop.purge(offsets)
            except Exception as exc:  # noqa: BLE001 - the next accepted commit purges on
                logger.warning("%s: purge failed (%s: %s)", type(hop).__name__,
                               type(exc).__name__, exc)
