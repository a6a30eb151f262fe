"""Kafka's errors, under the project's transient/terminal split."""

from __future__ import annotations

from girder_upload_stream.errors import TerminalError, TransientError

__all__ = ["KafkaTransientError", "KafkaTerminalError"]


class KafkaTransientError(TransientError):
    """A broker or network problem that a retry may fix."""


class KafkaTerminalError(TerminalError):
    """A Kafka problem a retry will not fix (bad settings, unknown topic, auth)."""
