"""Heartbeat messages as OpenMSIStream sends them (see the facts file): every
``interval`` seconds, a JSON string with a ``timestamp`` (ISO 8601, in UTC with its
``+00:00`` offset, as OpenMSIStream 1.8.8's ``HeartbeatProducible`` writes it) and the
messages and bytes read and processed since the previous heartbeat."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

__all__ = ["heartbeat_value", "Heartbeats"]


def heartbeat_value(delta: dict[str, int], now: datetime | None = None) -> str:
    """The JSON value of one heartbeat from counter deltas."""
    return json.dumps({
        "timestamp": (now or datetime.now(timezone.utc)).isoformat(),
        "n_messages_read": delta.get("messages_read", 0),
        "n_bytes_read": delta.get("bytes_read", 0),
        "n_messages_processed": delta.get("messages_processed", 0),
        "n_bytes_processed": delta.get("bytes_processed", 0),
    })


class Heartbeats:
    """A runner side job sending heartbeats through a producer with ``send(str)``."""

    def __init__(self, producer: Any, interval: float) -> None:
        self.producer = producer
        self.interval = interval
        self._last = time.monotonic()

    def tick(self, runner: Any, final: bool = False) -> None:
        if final or time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.producer.send(heartbeat_value(runner.processor.counters.take_delta()))
        if final:
            self.producer.close()
