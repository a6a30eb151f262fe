"""Log messages to a Kafka topic, as OpenMSIStream 1.8.x sends them (``--log_topic_name``).

Every ``--log_interval_secs`` (and once more at shutdown) one message keyed
``{program_id}_log`` whose value is the JSON object ``{"timestamp": <epoch seconds>,
"messages": [<log line>, ...]}``: the lines the program logged since the previous
message, oldest first, each the record's message (with its traceback, if any) and
nothing else, as OpenMSIStream formats them. The first message goes out at the loop's
first round, so it carries the start-up lines.

The lines wait in a bounded buffer: at most ``max.logs.per.message`` lines (the ``[log]``
section, default 65,536 as in OpenMSIStream) and at most :data:`DEFAULT_MAX_BYTES` of
JSON, so that a message stays under librdkafka's ``message.max.bytes``. When the buffer is
full the oldest lines are dropped and the next message starts with a line saying how
many. The values of known secrets (the Girder API key, passwords of the Kafka config) are
replaced by ``***`` in every line, should one ever reach a log record.

Pure module: the producer comes from :mod:`girder_upload_stream.kafka.side_producers`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from girder_upload_stream.errors import ConfigError

__all__ = ["DEFAULT_INTERVAL_SECS", "DEFAULT_MAX_LINES", "DEFAULT_MAX_BYTES",
           "NON_LIBRDKAFKA_KEYS", "LogTopic", "log_value", "LogBuffer", "LogMessages",
           "split_log_section"]

#: OpenMSIStream's defaults: ``--log_interval_secs`` and ``max.logs.per.message``.
DEFAULT_INTERVAL_SECS = 60.0
DEFAULT_MAX_LINES = 65536
#: JSON bytes of the lines of one message: under librdkafka's default 1 MB message size.
DEFAULT_MAX_BYTES = 900_000
#: Longer lines (a huge traceback) are cut (to an eighth of the byte bound if that is
#: less), so that one line cannot fill a message alone.
MAX_LINE_CHARS = 16384
#: ``[log]`` keys that configure the log messages, not the producer (as OpenMSIStream).
NON_LIBRDKAFKA_KEYS = ("max.logs.per.message", "log.level", "prefer.separate.producer")


@dataclass(frozen=True)
class LogTopic:
    """Where and how log messages go (``--log_*`` options and the ``[log]`` section)."""

    topic: str
    program_id: str
    interval_secs: float = DEFAULT_INTERVAL_SECS
    producer: dict[str, str] = field(default_factory=dict, repr=False)  # librdkafka
    max_lines: int = DEFAULT_MAX_LINES
    level: int = logging.NOTSET

    @property
    def key(self) -> str:
        return f"{self.program_id}_log"


def log_value(lines: Iterable[str], now: float | None = None) -> str:
    """The JSON value of one log message."""
    return json.dumps({"timestamp": time.time() if now is None else now,
                       "messages": list(lines)})


def split_log_section(section: dict[str, str], path: str | None = None
                      ) -> tuple[dict[str, str], int, int]:
    """``[log]`` settings as (librdkafka settings, max lines, handler level).

    ``max.logs.per.message`` (a positive integer) and ``log.level`` (a logging level
    name: ``debug``, ``info``...) are ours to read; the rest goes to the producer.
    A bad value is a :class:`ConfigError` naming ``path`` (the config file)."""
    producer = {k: v for k, v in section.items() if k not in NON_LIBRDKAFKA_KEYS}
    raw_max = section.get("max.logs.per.message", str(DEFAULT_MAX_LINES))
    try:
        max_lines = int(raw_max)
    except ValueError:
        max_lines = 0
    if max_lines < 1:
        raise ConfigError(f"max.logs.per.message must be a positive integer, got {raw_max!r}",
                          path=path, section="log", option="max.logs.per.message")
    raw_level = section.get("log.level", "NOTSET")
    level = logging.getLevelName(raw_level.strip().upper())
    if not isinstance(level, int):
        raise ConfigError(f"log.level must be a logging level name, got {raw_level!r}",
                          path=path, section="log", option="log.level")
    return producer, max_lines, level


class LogBuffer(logging.Handler):
    """A logging handler keeping the formatted lines until :meth:`take` (thread-safe).

    Bounded by ``max_lines`` lines and ``max_bytes`` of JSON; the oldest lines go first
    and are counted. ``secrets`` are masked in every line."""

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES, max_bytes: int = DEFAULT_MAX_BYTES,
                 secrets: Iterable[str] = (), level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))  # OpenMSIStream's lines
        self.max_lines, self.max_bytes = max_lines, max_bytes
        masks = {s for secret in secrets if secret and len(secret) >= 4
                 for s in (secret, quote(secret, safe=""))}
        self._secrets = sorted(masks, key=len, reverse=True)  # longest first
        self._lines: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self._dropped = 0
        self._guard = threading.Lock()

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._mask(self.format(record))
        except Exception:  # noqa: BLE001 - a bad record must not break logging
            self.handleError(record)
            return
        limit = min(MAX_LINE_CHARS, self.max_bytes // 8)  # a line never fills a message
        if len(text) > limit:
            text = f"{text[:limit]}... [{len(text) - limit} characters cut]"
        cost = len(json.dumps(text)) + 2  # the line and its ", " in the JSON list
        with self._guard:
            self._lines.append((text, cost))
            self._bytes += cost
            while len(self._lines) > self.max_lines or self._bytes > self.max_bytes:
                self._bytes -= self._lines.popleft()[1]
                self._dropped += 1

    def take(self) -> list[str]:
        """Every line since the last call, oldest first; a first line counts the lines
        dropped in between, if any."""
        with self._guard:
            lines = [text for text, _ in self._lines]
            dropped, self._dropped = self._dropped, 0
            self._lines.clear()
            self._bytes = 0
        if dropped:
            lines.insert(0, f"[{dropped} older log line(s) dropped: more were logged since "
                            f"the previous log message than one message holds]")
        return lines


class LogMessages:
    """Runner side job: attach a :class:`LogBuffer` to ``logger_name`` and send its lines
    through ``producer.send(str)`` at the first tick, every ``interval`` seconds after,
    and at the final tick (after which the buffer is detached and the producer closed).
    Sending is best effort: the producer logs failures and never raises.

    A logger left at Python's default (WARNING, e.g. a flow run where Prefect was not
    told about the package's loggers) would keep the start-up lines from the buffer:
    while attached, the logger lets through at least INFO (or the buffer's level)."""

    def __init__(self, producer: Any, interval: float, buffer: LogBuffer,
                 logger_name: str = "girder_upload_stream",
                 clock: Callable[[], float] = time.monotonic,
                 log_topic: LogTopic | None = None) -> None:
        self.producer, self.interval, self.buffer = producer, interval, buffer
        self.log_topic = log_topic  # the settings it was built from, if any
        self._logger = logging.getLogger(logger_name)
        self._level = self._logger.level  # restored by detach()
        wanted = buffer.level or logging.INFO
        if self._logger.getEffectiveLevel() > wanted:
            self._logger.setLevel(wanted)
        self._logger.addHandler(buffer)
        self._clock = clock
        self._last: float | None = None  # nothing sent yet: the first tick sends

    def tick(self, runner: Any, final: bool = False) -> None:
        now = self._clock()
        if not final and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        lines = self.buffer.take()
        if final:
            self.detach()  # the last send's own lines stay local
        self.producer.send(log_value(lines))
        if final:
            self.producer.close()

    def detach(self) -> None:
        """Stop collecting lines (at the end, or when the run could not be built)."""
        if self.buffer in self._logger.handlers:
            self._logger.removeHandler(self.buffer)
            self._logger.setLevel(self._level)
