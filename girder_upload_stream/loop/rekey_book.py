"""The pure rules of the re-key hop (``--rekey_by_file``): names, the key, the origin
headers, the book of acknowledged re-produced messages and the purge floor.

No Kafka import: :mod:`girder_upload_stream.loop.rekey_hop` drives the hop with the
clients of :mod:`girder_upload_stream.kafka.rekey`, and these rules are unit-tested
without a broker.

* **Names.** The internal topic is ``<topic>--<group>--by-file`` and the second hop
  reads it as the group ``<group>--by-file``: both say what they are, and two groups
  reading one source topic keep apart.
* **The key** of a re-produced chunk is its file: the path (subdir and filename) and the
  generation (the file's sha512 the chunk carries). **The partition** is chosen from the
  path alone, as Girder stores it (each part stripped of surrounding white space), so
  that all chunks of one file, and every generation of a path, land in one partition of
  the internal topic: one member at a time uploads into a Girder item, which lets a
  member skip the item twin checks outside hand-overs (kafka/gain_marks.py). It is
  chosen here, by an explicit stable hash (BLAKE2b, modulo the partitions: CRC-32 spread
  sequentially named files unevenly over the members), not by the
  producer's partitioner: every member of the group must send a file to the same
  partition whatever its client's settings. A message that names no file (not a
  chunk) is forwarded unchanged to a partition chosen from its original key (from its
  source partition when it has none): the second hop rejects it, once.
* **Origin headers** say where the message was read first: source topic, partition,
  offset and its original key (absent when it had none). The second hop reads them
  back (:func:`raw_message`), decodes the chunk with its original key and names the
  source coordinates in logs, registries and dead letters.
* **The book** (:class:`AckBook`): per source partition, the offsets read and not yet
  acknowledged by the broker; the committable offset is the lowest unacknowledged one,
  or one past the highest read. A failed delivery stays unacknowledged (it is sent
  again) and so holds the commit.
* **The purge floor** (:func:`purge_floors`): the internal topic's records below the
  second hop's accepted commit may be deleted, except rule 9's retry spans
  (ledger/offsets.py), which lie below that commit: the floor is the lowest retry span's
  start when there is one. Rule 8's pending spans are at or past the commit.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.ledger.offsets import safe_offsets
from girder_upload_stream.wire.commit_metadata import parse_failed, parse_metadata
from girder_upload_stream.shared_types import RawMessage
from girder_upload_stream.wire.codec import file_identity

__all__ = ["SUFFIX", "ORIGIN_HEADERS", "internal_topic", "names_a_topic", "internal_group",
           "file_key_bytes", "place_of",
           "partition_for", "route", "origin_headers", "origin_of", "raw_message", "AckBook",
           "purge_floors"]

TopicPartition = tuple[str, int]

#: What the internal topic's and the second hop's group's names end with.
SUFFIX = "--by-file"

#: Header names of a re-produced message (values: UTF-8 text, the key as is).
ORIGIN_HEADERS = {
    "topic": "gus.source.topic",
    "partition": "gus.source.partition",
    "offset": "gus.source.offset",
    "key": "gus.source.key",
}


def internal_topic(topic: str, group: str) -> str:
    """The internal topic of ``topic`` read by ``group``: ``<topic>--<group>--by-file``."""
    return f"{topic}--{group}{SUFFIX}"


def names_a_topic(name: str) -> bool:
    """Whether Kafka takes ``name`` as a topic name: at most 249 characters of letters,
    digits, ``.``, ``_`` and ``-`` (a group id is part of the internal topic's name)."""
    return len(name) <= 249 and re.fullmatch(r"[A-Za-z0-9._-]+", name) is not None


def internal_group(group: str) -> str:
    """The second hop's consumer group: ``<group>--by-file``."""
    return f"{group}{SUFFIX}"


def file_key_bytes(value: bytes | None) -> bytes | None:
    """The internal topic's key of a chunk message: its file's path and generation
    (sha512, hex); None when the value names no file (it is forwarded as is)."""
    located = _file_key_and_place(value)
    return None if located is None else located[0]


def place_of(rel_path: str) -> bytes:
    """What chooses a file's partition: its path as Girder stores it (each part
    stripped, as Girder strips names), so paths Girder would store as one item meet."""
    return "/".join(part.strip() for part in rel_path.split("/")).encode("utf-8")


def _file_key_and_place(value: bytes | None) -> tuple[bytes, bytes] | None:
    try:
        rel_path, file_hash = file_identity(value)
    except ChunkDecodeError:
        return None
    return (rel_path.encode("utf-8") + b"\x00" + file_hash.hex().encode("ascii"),
            place_of(rel_path))


def partition_for(key: bytes, partitions: int) -> int:
    """The internal partition of ``key``: its 64-bit BLAKE2b modulo ``partitions``
    (stable across processes, versions and client settings)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % partitions


def route(value: bytes | None, key: bytes | None, source_partition: int,
          partitions: int) -> tuple[bytes | None, int]:
    """``(key, partition)`` of one message on the internal topic: by its file (the
    partition by its path, :func:`place_of`), else
    (not a chunk) its original key and a partition from that key, or from its source
    partition when it has no key."""
    located = _file_key_and_place(value)
    if located is not None:
        by_file, place = located
        return by_file, partition_for(place, partitions)
    if key is not None:
        return key, partition_for(key, partitions)
    return None, source_partition % partitions


def origin_headers(topic: str, partition: int, offset: int,
                   key: bytes | None) -> list[tuple[str, bytes]]:
    """The headers of a re-produced message: where it was read, and its original key."""
    headers = [(ORIGIN_HEADERS["topic"], topic.encode("utf-8")),
               (ORIGIN_HEADERS["partition"], str(partition).encode("ascii")),
               (ORIGIN_HEADERS["offset"], str(offset).encode("ascii"))]
    if key is not None:
        headers.append((ORIGIN_HEADERS["key"], bytes(key)))
    return headers


@dataclass(frozen=True)
class Origin:
    """Where a re-produced message was read first."""

    topic: str
    partition: int
    offset: int
    key: bytes | None


def origin_of(headers: Sequence[tuple[str, bytes | None]] | None) -> Origin | None:
    """The origin a message's headers name; None without (or with malformed) ones."""
    if not headers:
        return None
    found: dict[str, bytes | None] = {}
    names = {v: k for k, v in ORIGIN_HEADERS.items()}
    for name, value in headers:
        if name in names:
            found[names[name]] = value
    try:
        return Origin(bytes(found["topic"] or b"").decode("utf-8"),
                      int(found["partition"] or b""), int(found["offset"] or b""),
                      found.get("key"))
    except (KeyError, ValueError):
        return None


def raw_message(msg: Any) -> RawMessage:
    """The second hop's view of a message of the internal topic (a confluent-kafka
    message): read where it is, named by its origin, decoded with its original key."""
    origin = origin_of(msg.headers())
    if origin is None:
        return RawMessage(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())
    return RawMessage(msg.topic(), msg.partition(), msg.offset(), origin.key, msg.value(),
                      (origin.topic, origin.partition, origin.offset))


@dataclass
class AckBook:
    """Source offsets read by the first hop and not yet acknowledged on the internal
    topic, per partition, and what was committed. Not thread-safe: the loop owns it."""

    _next: dict[TopicPartition, int] = field(default_factory=dict)
    _unacked: dict[TopicPartition, set[int]] = field(default_factory=dict)
    _committed: dict[TopicPartition, int] = field(default_factory=dict)

    def read(self, tp: TopicPartition, offset: int) -> None:
        """``offset`` was read and handed to the producer (not acknowledged yet)."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        self._unacked.setdefault(tp, set()).add(offset)

    def acked(self, tp: TopicPartition, offset: int) -> None:
        """The broker acknowledged the re-produced copy of ``offset``."""
        unacked = self._unacked.get(tp)
        if unacked is not None:
            unacked.discard(offset)

    @property
    def unacked(self) -> int:
        return sum(len(offsets) for offsets in self._unacked.values())

    def committable(self, tps: Iterable[TopicPartition] | None = None
                    ) -> dict[TopicPartition, int]:
        """Per partition, one past the highest offset below which every read message is
        acknowledged, where it moved past the last commit: the offsets' rule 6, with the
        unacknowledged messages as the pending ones."""
        return safe_offsets(self._next, self._unacked, self._committed, tps)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """The broker accepted these commits."""
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions revoked or lost: their next owner reads them from the last commit."""
        for tp in tps:
            self._next.pop(tp, None)
            self._unacked.pop(tp, None)
            self._committed.pop(tp, None)


def purge_floors(accepted: dict[TopicPartition, int | tuple[int, str | None]],
                 owned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """Below which offset the records of each owned internal partition may be deleted,
    given the second hop's commits the broker accepted (``offset`` or ``(offset,
    metadata)``): the commit, or the start of its lowest retry span (rule 9) if lower.
    Commit metadata that is not ours (or absent) keeps the commit as the floor."""
    mine = set(owned)
    floors = {}
    for tp, value in accepted.items():
        if tp not in mine:
            continue
        offset, metadata = value if isinstance(value, tuple) else (value, None)
        retry = parse_failed(metadata) if parse_metadata(metadata) is not None else []
        floor = min([offset, *(start for start, _ in retry)])
        if floor > 0:
            floors[tp] = floor
    return floors
