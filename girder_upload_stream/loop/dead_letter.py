"""The dead-letter topic: every message the consumer rejects, produced there unchanged.

The registry records why a message or a file was rejected; with ``--dead_letter_topic``
the messages themselves are also kept, byte for byte (same key, same value), in a topic
of the operator's choice, where they can be inspected and replayed (docs/configuration.md,
"The dead-letter topic"). Each carries headers that say what happened, named after
Kafka Connect's ``__connect.errors.*`` (see :data:`HEADERS`).

:class:`DeadLetters` is the rejection sink's Kafka half: the registry recorder hands it
each rejected message (its bytes in hand) or each message of a rejected file (only its
offset: the chunks' bytes were not kept, so they are read again from the topic). The
run's :class:`~girder_upload_stream.loop.checkpoint.Checkpoint` calls
:meth:`DeadLetters.settle` before each offset commit (its step 2), and commits only
when it returns True: every dead letter queued so far was acknowledged by the broker.
A message not acknowledged is sent again at the next commit; while the topic cannot be
written, commits wait (the messages are read again after a restart, and dead-lettered
again: at least once). Bytes held for messages not yet acknowledged are bounded
(:data:`HELD_BYTES`): beyond, only their offsets are kept and they are read again.

No Kafka import here: the producer and the fetch function are given
(:mod:`girder_upload_stream.kafka.side_producers`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from girder_upload_stream import __version__
from girder_upload_stream.loop.rekey_book import origin_of
from girder_upload_stream.text_bounds import bounded

__all__ = ["DeadLetters", "DeadLetter", "HEADERS", "HELD_BYTES", "FETCH_ATTEMPTS",
           "headers_of"]

logger = logging.getLogger(__name__)

#: Header names (values are UTF-8 text).
HEADERS = {
    "reason": "gus.errors.reason",              # why, as in the registry's reason
    "kind": "gus.errors.kind",                  # message_rejected | file_rejected | chunk_rejected | flood
    "topic": "gus.errors.topic",                # where the message was read
    "partition": "gus.errors.partition",
    "offset": "gus.errors.offset",
    "group": "gus.errors.consumer.group",
    "file": "gus.errors.file",                  # the file it belongs to, if known
    "version": "gus.version",                   # girder-upload-stream's version
}
#: Bytes of rejected messages held while not yet acknowledged; beyond, offsets only.
HELD_BYTES = 64 << 20
#: Reads of a message again by offset before it is given up (gone from the topic).
FETCH_ATTEMPTS = 3


@dataclass
class DeadLetter:
    """One rejected message on its way to the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    reason: str
    kind: str
    file: str | None = None
    key: bytes | None = None
    value: bytes | None = None
    fetched: bool = False  # False: the bytes must be read again from the topic first
    fetch_attempts: int = 0

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"")


def headers_of(letter: DeadLetter, group: str) -> list[tuple[str, bytes]]:
    """The headers of one dead letter (text bounded: the reason and the file name come
    from the message)."""
    values = {"reason": bounded(letter.reason, 1000), "kind": letter.kind,
              "topic": letter.topic, "partition": str(letter.partition),
              "offset": str(letter.offset), "group": group, "version": __version__}
    if letter.file is not None:
        values["file"] = bounded(letter.file, 500)
    return [(HEADERS[name], value.encode("utf-8")) for name, value in values.items()]


def _from_origin(letter: DeadLetter, headers: tuple[Any, ...]) -> None:
    """A message read again from the internal topic of ``--rekey_by_file``: the letter
    names where it was produced and carries its original key (loop/rekey_book.py)."""
    origin = origin_of(headers[0]) if headers else None
    if origin is not None:
        letter.topic, letter.partition, letter.offset = (origin.topic, origin.partition,
                                                         origin.offset)
        letter.key = origin.key


class DeadLetters:
    """Queue rejected messages for the dead-letter topic and say when all are in it.

    ``producer``: a :class:`~girder_upload_stream.kafka.side_producers.DeadLetterProducer`;
    ``fetch(wanted, timeout)``: reads messages again by offset
    (:func:`~girder_upload_stream.kafka.side_producers.fetch_messages` bound to the
    consumer's settings)."""

    def __init__(self, producer: Any, fetch: Callable[..., dict], group: str,
                 flush_seconds: float = 2.0, fetch_seconds: float = 10.0) -> None:
        self.producer, self._fetch, self.group = producer, fetch, group
        self.flush_seconds, self.fetch_seconds = flush_seconds, fetch_seconds
        self._waiting: dict[int, DeadLetter] = {}   # not sent yet (or sent and failed)
        self._in_flight: dict[int, DeadLetter] = {}  # sent, no answer yet
        self._tokens = itertools.count()
        self._held = 0
        self._failing = False
        self.sent = 0  # acknowledged by the broker, since start

    # -- the rejection sink ----------------------------------------------------------
    def message(self, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, reason: str, kind: str, file: str | None = None) -> None:
        """A rejected message whose bytes are in hand."""
        letter = DeadLetter(topic, partition, offset, reason, kind, file, key, value, True)
        if self._held + letter.size > HELD_BYTES:
            letter.key = letter.value = None
            letter.fetched = False  # read again at settle time
        self._add(letter)

    def offsets(self, where: list[tuple[tuple[str, int], int]], reason: str, kind: str,
                file: str | None = None) -> None:
        """Rejected messages known by their offsets only (a rejected file's chunks)."""
        for (topic, partition), offset in where:
            self._add(DeadLetter(topic, partition, offset, reason, kind, file))

    def _add(self, letter: DeadLetter) -> None:
        self._held += letter.size
        self._waiting[next(self._tokens)] = letter

    @property
    def pending(self) -> int:
        """Dead letters not acknowledged yet."""
        return len(self._waiting) + len(self._in_flight)

    # -- before each commit ----------------------------------------------------------
    def settle(self) -> bool:
        """Send what waits, wait (``flush_seconds`` at most) for the broker's answers and
        return True only when every dead letter so far is acknowledged."""
        if not self._waiting and not self._in_flight:
            return True
        self._fill()
        for token in sorted(self._waiting):
            letter = self._waiting[token]
            if letter.fetched:
                del self._waiting[token]
                self._in_flight[token] = letter
                self.producer.send(token, letter.key, letter.value,
                                   headers_of(letter, self.group), self._delivered)
        self.producer.flush(self.flush_seconds)
        ok = not self._waiting and not self._in_flight
        self._report(ok)
        return ok

    def _fill(self) -> None:
        """Read again the bytes of the waiting letters known by offset only."""
        wanted: dict[tuple[str, int], set[int]] = {}
        for letter in self._waiting.values():
            if not letter.fetched:
                wanted.setdefault((letter.topic, letter.partition), set()).add(letter.offset)
        if not wanted:
            return
        found = self._fetch(wanted, self.fetch_seconds)
        for token, letter in list(self._waiting.items()):
            where = (letter.topic, letter.partition, letter.offset)
            if letter.fetched:
                continue
            if where in found:
                letter.key, letter.value = found[where][:2]
                letter.fetched = True
                _from_origin(letter, found[where][2:])
                continue
            letter.fetch_attempts += 1
            if letter.fetch_attempts >= FETCH_ATTEMPTS:
                del self._waiting[token]
                logger.error("%s[%d]@%d (%s) could not be read again from the topic in %d "
                             "attempts (deleted by retention?): it is not in the dead-letter "
                             "topic", letter.topic, letter.partition, letter.offset,
                             bounded(letter.reason), FETCH_ATTEMPTS)

    def _delivered(self, token: int, error: str | None) -> None:
        letter = self._in_flight.pop(token, None)
        if letter is None:
            return
        if error is None:
            self.sent += 1
            self._held -= letter.size
        else:
            self._waiting[token] = letter  # sent again at the next settle
            logger.debug("dead letter %s[%d]@%d not acknowledged: %s", letter.topic,
                         letter.partition, letter.offset, error)

    def _report(self, ok: bool) -> None:
        if not ok and not self._failing:
            logger.error("%d rejected message(s) are not yet acknowledged by the dead-letter "
                         "topic %s: offset commits wait until they are", self.pending,
                         self.producer.topic)
        elif ok and self._failing:
            logger.warning("the dead-letter topic %s acknowledged every rejected message: "
                           "offset commits resume", self.producer.topic)
        self._failing = not ok

    def tick(self, runner: Any, final: bool = False) -> None:
        """Runner side job: at the end (after the last commit), close the producer."""
        if final:
            self.producer.close()
