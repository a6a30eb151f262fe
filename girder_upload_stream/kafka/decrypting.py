"""What happens to messages of an encrypted topic between Kafka and the pipeline.

Pure logic (no Kafka, kafkacrypto or Girder import): the consumer group feeds it the
messages it polls and a ``decrypt(topic, key, value)`` function (kafka_crypto.py), and
asks it which plaintext messages go on to the pipeline and which offsets may be
committed. The rules:

1. A message whose key and value decrypt goes on at once.
2. A message encrypted with a key this node does not have yet *waits* for the key
   exchange, without blocking the loop: it is tried again every half second while the
   messages after it go on. It waits ``max_initial_wait_per_decrypt`` seconds (60)
   until the first message of the run has had to be given up, and
   ``max_wait_per_decrypt`` (5) after that, as OpenMSIStream's deserializer does; but
   waits run side by side, not one message after the other.
3. When its wait is over, the message is *given up for now*: logged, and registered in
   the in-progress registry as ``failed`` with the reason. It is **never committed**:
   the consumer group's committed offset of its partition stays at or below it (the
   commit metadata lists it as pending), so a restart of the group reads it again. It
   is still tried every few seconds while this consumer runs (its bytes are kept up to
   a memory cap), so a producer that comes back later is enough. Once it decrypts, it
   goes on and its registry row is removed.
4. A message that is not a KafkaCrypto message at all (plaintext in an encrypted
   topic) can never be decrypted. With ``--treat_undecryptable_as_plaintext`` it goes
   on as it is (and the pipeline decodes it like any plaintext chunk); without, it is
   registered as ``failed`` with the reason and, like a message given up, left
   uncommitted: a run of the same group with the flag reads it again as plaintext.
5. While more than ``wait_bytes`` of messages wait within their wait, fetching pauses
   (back-pressure), so a topic encrypted with keys this node cannot get does not
   fill the memory; messages given up keep at most ``keep_bytes``, the oldest drop
   their bytes first (they are then retried after a restart only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.wire.commit_metadata import (format_metadata, parse_metadata,
                                                       parse_spans, spans_of)
from girder_upload_stream.shared_types import RawMessage

__all__ = ["Decryption", "DecryptingReader", "PlainMessage", "UndecryptedMessageError",
           "NOT_DECRYPTED", "NOT_ENCRYPTED"]

logger = logging.getLogger(__name__)

NOT_DECRYPTED = "not decrypted"
NOT_ENCRYPTED = "not a KafkaCrypto message"
_WAIT_RETRY_SECONDS = 0.5
_GIVEN_UP_RETRY_SECONDS = 5.0
_CLEAR, _WAIT, _NEVER = "clear", "wait", "never"  # kafka_crypto.PartState's values

TopicPartition = tuple[str, int]


class Decryption(Protocol):
    """One message being decrypted (kafka_crypto.MessageDecryption)."""

    size: int

    @property
    def state(self) -> str: ...
    def retry(self) -> str: ...
    def never_parts(self) -> list[str]: ...
    def plaintext(self) -> tuple[bytes | None, bytes | None]: ...
    def release(self) -> None: ...


class UndecryptedMessageError(ChunkDecodeError):
    """A message of an encrypted topic that could not be decrypted (registry entry)."""

    keeps_its_row = True  # its row holds the offset uncommitted: never summarised


class PlainMessage:
    """A decrypted message, with the accessors of a confluent-kafka message."""

    __slots__ = ("_topic", "_partition", "_offset", "_key", "_value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value = key, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


@dataclass
class _Held:
    topic: str
    partition: int
    offset: int
    decryption: Decryption
    read_at: float
    tried_at: float
    given_up: bool = False
    waited: float = 0.0  # the wait it was given up after

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


def _row_name(topic: str, partition: int, offset: int) -> str:
    return f"message {topic}[{partition}]@{offset}"  # how the recorder names such rows


def _merge(*span_lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of ``[start, end)`` span lists, sorted, overlapping spans joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for spans in span_lists for span in spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class DecryptingReader:
    """Turns polled messages into decrypted ones, and keeps commits behind the ones
    that are not (see the module's rules)."""

    def __init__(self, decrypt: Callable[[str, bytes | None, bytes | None], Decryption], *,
                 treat_undecryptable_as_plaintext: bool = False,
                 max_wait_per_decrypt: float = 5.0,
                 max_initial_wait_per_decrypt: float = 60.0, recorder: Any = None,
                 wait_bytes: int = 32 << 20, keep_bytes: int = 64 << 20,
                 on_close: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._decrypt = decrypt
        self.as_plaintext = treat_undecryptable_as_plaintext
        self.max_wait, self.max_initial_wait = max_wait_per_decrypt, max_initial_wait_per_decrypt
        self._recorder = recorder
        self.wait_bytes, self.keep_bytes = wait_bytes, keep_bytes
        self._clock, self._on_close = clock, on_close
        # Held messages with their bytes (waiting, or given up and still retried) ...
        self._held: dict[tuple[str, int, int], _Held] = {}
        # ... and held offsets alone (no retry before a restart), which may be many.
        self._holes: dict[TopicPartition, set[int]] = {}
        self._gave_up_once = False
        self.decrypted = 0
        self.rejected = 0
        self._rows = self._registered_rows()

    # -- reading -----------------------------------------------------------------------
    def take(self, messages: Iterable[Any]) -> list[PlainMessage]:
        """The plaintext messages ready now: earlier ones whose key came, then the new
        ones that decrypt at once. The others are held (rules 2 and 3)."""
        now = self._clock()
        ready, given_up = self._retry_held(now)
        for msg in messages:
            decryption = self._decrypt(msg.topic(), msg.key(), msg.value())
            entry = _Held(msg.topic(), msg.partition(), msg.offset(), decryption, now, now)
            state = decryption.state
            if state == _WAIT:
                self._held[(entry.topic, entry.partition, entry.offset)] = entry
            else:
                self._settle(entry, state, ready)
        self._release_over_cap()
        if given_up:
            self._report(given_up)
        return ready

    def _retry_held(self, now: float) -> tuple[list[PlainMessage], list[_Held]]:
        ready: list[PlainMessage] = []
        given_up: list[_Held] = []
        for key in sorted(self._held):
            entry = self._held[key]
            pause = _GIVEN_UP_RETRY_SECONDS if entry.given_up else _WAIT_RETRY_SECONDS
            if now - entry.tried_at >= pause:
                entry.tried_at = now
                state = entry.decryption.retry()
                if state != _WAIT:
                    del self._held[key]
                    self._settle(entry, state, ready)
                    continue
            limit = self.max_wait if self._gave_up_once else self.max_initial_wait
            if not entry.given_up and now - entry.read_at >= limit:
                entry.given_up, entry.waited = True, limit
                given_up.append(entry)
        if given_up:
            self._gave_up_once = True
        return ready, given_up

    def _settle(self, entry: _Held, state: str, ready: list[PlainMessage]) -> None:
        """A message that no longer waits: on to the pipeline, or held for good (rule 4)."""
        if state == _NEVER and not self.as_plaintext:
            parts = " and ".join(entry.decryption.never_parts())
            self._register(entry, f"{NOT_ENCRYPTED}: its {parts} cannot be decrypted by any "
                                  f"key (plaintext in an encrypted topic?); left uncommitted: "
                                  f"run this group with --treat_undecryptable_as_plaintext to "
                                  f"read such messages as plaintext")
            if not self.rejected:
                logger.error("%s[%d]@%d is %s (plaintext in an encrypted topic?): registered "
                             "as failed and left uncommitted; --treat_undecryptable_as_"
                             "plaintext reads such messages as plaintext", entry.topic,
                             entry.partition, entry.offset, NOT_ENCRYPTED)
            self.rejected += 1
            self._hole(entry)  # no key can help: nothing to retry in this run
            return
        key, value = entry.decryption.plaintext()
        if entry.given_up:
            logger.info("%s[%d]@%d decrypted after all", entry.topic, entry.partition,
                        entry.offset)
        self._forget_row(entry)
        self.decrypted += state == _CLEAR
        ready.append(PlainMessage(entry.topic, entry.partition, entry.offset, key, value))

    def _hole(self, entry: _Held) -> None:
        """Keep only the offset of a held message: its bytes are dropped."""
        entry.decryption.release()
        self._held.pop((entry.topic, entry.partition, entry.offset), None)
        self._holes.setdefault(entry.tp, set()).add(entry.offset)

    def _release_over_cap(self) -> None:
        """Rule 5: drop the bytes of the oldest given-up messages beyond ``keep_bytes``."""
        kept = 0
        for key in sorted(self._held, reverse=True):
            entry = self._held[key]
            if entry.given_up:
                kept += entry.decryption.size
                if kept > self.keep_bytes:
                    self._hole(entry)

    def _report(self, given_up: list[_Held]) -> None:
        where = ", ".join(f"{e.topic}[{e.partition}]@{e.offset}" for e in given_up[:5])
        more = f" and {len(given_up) - 5} more" if len(given_up) > 5 else ""
        waited = max(e.waited for e in given_up)
        for entry in given_up:
            self._register(entry, f"{NOT_DECRYPTED}: no key for it arrived within "
                                  f"{entry.waited:g}s; left uncommitted, it is tried again "
                                  f"while the consumer runs and read again after a restart")
        logger.warning(
            "%d message(s) could not be decrypted within %gs (%s%s): no producer answered "
            "this KafkaCrypto node's key request. They are NOT committed: this consumer "
            "keeps trying them and a restart of the group reads them again. Check that "
            "this node is provisioned with the producers' root of trust and for this "
            "topic, and that a producer (or controller) of the topic is running.",
            len(given_up), waited, where, more)

    # -- registry ----------------------------------------------------------------------
    def _register(self, entry: _Held, reason: str) -> None:
        if self._recorder is None:
            return
        error = UndecryptedMessageError(reason, topic=entry.topic, partition=entry.partition,
                                        offset=entry.offset)
        self._recorder.message_rejected(
            RawMessage(entry.topic, entry.partition, entry.offset, None, None), error)
        self._rows.add((entry.topic, entry.partition, entry.offset))

    def _registered_rows(self) -> set[tuple[str, int, int]]:
        """Messages an earlier run registered as not decrypted (their rows are removed
        when they decrypt after a restart)."""
        table = getattr(self._recorder, "in_progress", None)
        found = set()
        for row in table.rows() if table is not None else ():
            reason = str(row.extra.get("reason", ""))
            if row.generation.startswith("offset-") and reason.startswith((NOT_DECRYPTED,
                                                                           NOT_ENCRYPTED)):
                name = row.rel_filepath.name
                topic = name[len("message "):].rsplit("[", 1)[0]
                found.add((topic, int(row.extra["partition"]), int(row.extra["offset"])))
        return found

    def _forget_row(self, entry: _Held) -> None:
        key = (entry.topic, entry.partition, entry.offset)
        if key not in self._rows:
            return
        self._rows.discard(key)
        table = getattr(self._recorder, "in_progress", None)
        if table is not None:
            from girder_upload_stream.registry.tables import RowKey
            table.remove(RowKey(PurePosixPath(_row_name(*key)),
                                f"offset-{entry.partition}-{entry.offset}"))

    # -- state for the consumer group --------------------------------------------------
    @property
    def waiting(self) -> bool:
        """True while some message is still within its wait (not idle yet)."""
        return any(not e.given_up for e in self._held.values())

    @property
    def backlog_full(self) -> bool:
        """Rule 5: pause fetching while this many bytes wait within their wait."""
        return sum(e.decryption.size for e in self._held.values()
                   if not e.given_up) > self.wait_bytes

    @property
    def not_decrypted(self) -> int:
        """Messages given up (for now) and still not decrypted."""
        return (sum(e.given_up for e in self._held.values())
                + sum(map(len, self._holes.values())))

    @property
    def held(self) -> int:
        """Messages held back: waiting for a key, or given up for now."""
        return len(self._held) + sum(map(len, self._holes.values()))

    def held_offsets(self, tp: TopicPartition) -> list[int]:
        """Offsets of ``tp`` held back (waiting or given up), in order."""
        return sorted([e.offset for e in self._held.values() if e.tp == tp]
                      + list(self._holes.get(tp, ())))

    def clamp(self, offsets: dict[TopicPartition, tuple[int, str]]
              ) -> dict[TopicPartition, tuple[int, str]]:
        """The commits to send the broker instead of ``offsets``: a partition's offset
        never passes its lowest held message, and the metadata lists every held message
        below the high watermark as pending (offsets rule 8), so a restart reads it."""
        result = {}
        for tp, (offset, metadata) in offsets.items():
            held = self.held_offsets(tp)
            if not held:
                result[tp] = (offset, metadata)
                continue
            high = parse_metadata(metadata)
            start = min(offset, held[0])
            if high is None:
                result[tp] = (start, metadata)
                continue
            spans = parse_spans(metadata, offset)
            listed = spans if spans is not None else [(offset, high)]
            held_spans = list(spans_of(h for h in held if h < high))
            result[tp] = (start, format_metadata(high, start, _merge(listed, held_spans)))
        return result

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions revoked: their held messages go to the next owner (from the commit)."""
        lost = set(tps)
        for key in [k for k, e in self._held.items() if e.tp in lost]:
            del self._held[key]
        for tp in lost:
            self._holes.pop(tp, None)

    def report_left(self) -> None:
        """Say what is left: the messages that stay uncommitted for a restart (called
        before the consumer leaves its group, which revokes, and forgets, them)."""
        by_tp: dict[TopicPartition, list[int]] = {tp: list(o) for tp, o in self._holes.items()
                                                  if o}
        for entry in self._held.values():
            by_tp.setdefault(entry.tp, []).append(entry.offset)
        if by_tp:
            where = "; ".join(f"{t}[{p}] from offset {min(o)} ({len(o)})"
                              for (t, p), o in sorted(by_tp.items()))
            logger.warning("%d message(s) could not be decrypted and were left "
                           "uncommitted (%s): the next run of this group reads them again",
                           self.held, where)

    def close(self) -> None:
        """Forget what is held and stop the KafkaCrypto node."""
        self._held.clear()
        self._holes.clear()
        if self._on_close is not None:
            self._on_close()
