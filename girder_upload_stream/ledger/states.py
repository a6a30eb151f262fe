"""The states and roles of a file's ledger record (see :mod:`.records` for the machine)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FileState", "Role"]


class FileState(StrEnum):
    ASSEMBLING = "assembling"
    STREAMING = "streaming"  # assembling, and its in-order prefix goes to a Girder upload
    RELEASED = "released"  # still assembling, but no longer holding commits (stale)
    READY = "ready"
    UPLOADING = "uploading"
    WAITING_TO_RETRY = "waiting_to_retry"
    DONE = "done"
    FAILED = "failed"


class Role(StrEnum):
    FIRST = "first"  # holds its messages' commits until settled
    AGAIN = "again"  # produced again: Girder has the content already, holds nothing
