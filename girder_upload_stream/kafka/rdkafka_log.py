"""librdkafka's own log lines through the project's logger, and waits on the broker
that Ctrl-C can end.

Left alone, librdkafka prints every line it logs on standard error (``%3|...|FAIL|...``):
about 20 a second while a broker is unreachable, 580 before a start-up error can say so
in one line. Every client this package makes gets :class:`RdkafkaLog` as its ``logger``
setting instead: the lines go to the logger ``girder_upload_stream.kafka.librdkafka``,
the routine ones (a broker that cannot be reached, a client terminating, anything below
a warning) at DEBUG, the others at their own level but at most once per facility every
:data:`REPEAT_SECONDS`, with the count of the similar lines held back.

:func:`wait_for_topic` asks the broker for a topic's metadata in short slices, so that a
SIGINT is acted on within a second, and turns "no broker answered" into one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from girder_upload_stream.kafka.errors import KafkaTerminalError

__all__ = ["RdkafkaLog", "with_log", "wait_for_topic", "topic_problem", "REPEAT_SECONDS", "SLICE_SECONDS",
           "ROUTINE_FACILITIES"]

logger = logging.getLogger("girder_upload_stream.kafka.librdkafka")

#: The shortest time between two lines of one facility shown above DEBUG.
REPEAT_SECONDS = 30.0

#: The longest one metadata request may block (a SIGINT waits at most this long).
SLICE_SECONDS = 0.5

#: Facilities whose lines say what our own messages say better: the broker cannot be
#: reached (the start-up check, the error callback and the progress line report it),
#: a client closing with messages queued (the side producers count them).
ROUTINE_FACILITIES = frozenset({"FAIL", "BROKERFAIL", "CONNECT", "REQTMOUT", "RETRY",
                                "TERMINATE", "DESTROY", "CLOSE"})


class RdkafkaLog:
    """confluent-kafka's ``logger`` setting: it calls ``log(level, "%s [%s] %s",
    facility, client name, text)`` for each librdkafka line, from the thread that polls
    the client."""

    def __init__(self, target: logging.Logger = logger, repeat: float = REPEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target, self._repeat, self._clock = target, repeat, clock
        self._shown_at: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        facility = str(args[0]) if args else ""
        if level < logging.WARNING or facility in ROUTINE_FACILITIES:
            self._target.debug("librdkafka: %s", text)
            return
        now = self._clock()
        shown = self._shown_at.get(facility)
        if shown is not None and now - shown < self._repeat:
            self._held[facility] = self._held.get(facility, 0) + 1
            self._target.debug("librdkafka: %s", text)
            return
        self._shown_at[facility] = now
        held = self._held.pop(facility, 0)
        more = f" ({held} similar line(s) in the last {self._repeat:g} s)" if held else ""
        self._target.log(level, "librdkafka: %s%s", text, more)


def with_log(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` for a confluent-kafka client, with librdkafka's lines routed to our
    logger (unless the caller set a ``logger`` of its own)."""
    return settings if "logger" in settings else {**settings, "logger": RdkafkaLog()}


def wait_for_topic(client: Any, topic: str, seconds: float, servers: str) -> Any:
    """The metadata of ``topic`` (``TopicMetadata``, its ``error`` set when the broker
    does not know it), asked of ``client`` (a Consumer or Producer) for up to
    ``seconds``; :class:`KafkaTerminalError` when no broker answered by then. Each
    request blocks at most :data:`SLICE_SECONDS`, so a SIGINT's KeyboardInterrupt
    comes through within a second."""
    from confluent_kafka import KafkaError, KafkaException
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            metadata = client.list_topics(topic, timeout=max(0.05, min(SLICE_SECONDS, left)))
            return metadata.topics.get(topic)
        except KafkaException as exc:
            if exc.args[0].code() not in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
                raise
        if left <= SLICE_SECONDS:
            raise KafkaTerminalError(
                f"no Kafka broker answered at {servers} in {seconds:g} s: is Kafka running, "
                "and are bootstrap.servers in the config file right?", topic=topic)


def topic_problem(found: Any) -> str | None:
    """Why the topic :func:`wait_for_topic` returned cannot be used, or None when it
    can: the broker's error, or "unknown topic" when the broker did not list it."""
    if found is None:
        return "unknown topic"
    return found.error.str() if found.error is not None else None
