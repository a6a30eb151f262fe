"""Which files no other member of a group can be uploading: the gain marks of a group
that reads a topic keyed by file (``--rekey_by_file``'s second hop).

Two members of one group may upload one file at the same moment only if both read all
of its messages. Where every message of a file (all its chunks, every production of its
path) lands in one partition, and one member at a time owns a partition, that happens
only around a hand-over: the previous owner may still upload a file it read (its uploads
in flight at the revoke are checked for twins, :func:`~girder_upload_stream.ledger.units.mark_moved`)
while the new owner reads the same messages again from the last commit.

The new owner therefore remembers, for each partition it gains, the end of the log at
that moment (the *mark*): a message at or past the mark was written after the hand-over,
so no earlier owner read it. A file all of whose pending messages lie at or past the
marks of partitions this member still owns is its alone: its item needs no twin check
(two requests fewer per file). A file with any message below a mark, or on a partition
whose mark is unknown (the broker did not say), or with no pending message at all (a
retry of a file read by an earlier run) is checked as before.

Folders are another matter: files of one sub-folder land in different partitions, so
two members may create a new folder at once whenever the group has several members;
folder twin checks follow :attr:`ConsumerGroup.shared` and are not relaxed here.

No Kafka import: the marks are fed by :class:`~girder_upload_stream.kafka.clients.ConsumerGroup`
and unit-tested without a broker.
"""

from __future__ import annotations

from collections.abc import Iterable

from girder_upload_stream.shared_types import PartitionInfo

__all__ = ["GainMarks"]

TopicPartition = tuple[str, int]


class GainMarks:
    """The end of each owned partition's log when it was gained (see the module).

    ``keyed_by_file``: the topic is keyed by file (the re-key hop's internal topic);
    otherwise nothing is ever alone (a file's chunks spread over partitions)."""

    def __init__(self, keyed_by_file: bool = False) -> None:
        self.keyed_by_file = keyed_by_file
        self._marks: dict[TopicPartition, int | None] = {}

    def gained(self, starts: Iterable[PartitionInfo]) -> None:
        """Partitions just assigned, with the end of their log then (None: unknown)."""
        for start in starts:
            self._marks[(start.topic, start.partition)] = start.high

    def lost(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions revoked or lost: a later gain sets a new mark."""
        for tp in tps:
            self._marks.pop(tp, None)

    def clear(self) -> None:
        self._marks.clear()

    def alone(self, positions: Iterable[tuple[TopicPartition, int]]) -> bool:
        """Whether the messages at ``positions`` (a file's pending ones) were all written
        after this member gained their partitions, which it still owns; False for none."""
        if not self.keyed_by_file:
            return False
        seen = False
        for tp, offset in positions:
            mark = self._marks.get(tp)
            if mark is None or offset < mark:
                return False
            seen = True
        return seen
