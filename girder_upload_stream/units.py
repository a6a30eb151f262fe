"""What travels between the polling loop and the upload tasks.

An :class:`UploadUnit` groups completed files so that many small files cost one Prefect
task run (the local Prefect server records only ~45 task runs per second); a retry
re-runs the whole unit, which is safe because uploads skip identical content.
"""

from __future__ import annotations

import queue
import threading
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from girder_upload_stream.codec import FileKey
from girder_upload_stream.reassembly import CompletedFile

__all__ = ["Outcome", "FileOutcome", "UploadUnit", "group_into_units", "stripe_into_units",
           "open_channel", "report_outcome", "drain_channel", "close_channel",
           "mark_moved", "is_shared"]


class Outcome(StrEnum):
    UPLOADED = "uploaded"                    # a new item was created
    REPLACED = "replaced"                    # --replace_existing swapped different content
    SKIPPED_IDENTICAL = "skipped_identical"  # the same content is already there
    SKIPPED_DIFFERENT = "skipped_different"  # different content there; not replaced
    FAILED_TERMINAL = "failed_terminal"      # cannot succeed (bad name, permissions)
    FAILED_TRANSIENT = "failed_transient"    # may succeed later (server down, 5xx)

    @property
    def durable(self) -> bool:
        """True when the file's messages may be committed (it is in Girder or never will be)."""
        return self is not Outcome.FAILED_TRANSIENT


@dataclass(frozen=True)
class FileOutcome:
    rel_path: str
    file_key: FileKey
    outcome: Outcome
    reason: str = ""
    item_id: str | None = None
    requests: int = 0


@dataclass
class UploadUnit:
    unit_id: int
    files: list[CompletedFile] = field(default_factory=list)
    #: Where the task reports each file's outcome as soon as it lands (see
    #: :func:`open_channel`); None: the outcomes come only with the unit's result.
    channel: str | None = None
    #: Another consumer of the group may upload the same files now (see
    #: :meth:`GirderStore.upload`); set by the loop from the group's state.
    shared: bool = False

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def file_keys(self) -> list[FileKey]:
        return [f.file_key for f in self.files]


def group_into_units(files: list[CompletedFile], first_id: int, max_files: int,
                     max_bytes: int) -> list[UploadUnit]:
    """Pack files, in order, into units of at most ``max_files`` files and ``max_bytes``
    bytes (a file larger than ``max_bytes`` travels alone)."""
    units: list[UploadUnit] = []
    current = UploadUnit(first_id)
    size = 0
    for completed in files:
        if current.files and (len(current.files) >= max_files
                              or size + completed.size > max_bytes):
            units.append(current)
            current, size = UploadUnit(first_id + len(units)), 0
        current.files.append(completed)
        size += completed.size
    if current.files:
        units.append(current)
    return units


def stripe_into_units(files: list[CompletedFile], first_id: int, n_units: int,
                      max_files: int, max_bytes: int
                      ) -> tuple[list[UploadUnit], list[CompletedFile]]:
    """Deal files, in order, round robin into at most ``n_units`` units of at most
    ``max_files`` files and ``max_bytes`` bytes (a larger file travels alone); returns
    the units and the files left over (from the first that did not fit, in order).

    Units that run side by side then work through the files in their order together,
    so the oldest file not yet uploaded stays close to the newest one uploaded: the
    committed offsets follow the uploads closely, and a restart re-reads little."""
    units = [UploadUnit(first_id + i) for i in range(max(1, n_units))]
    sizes = [0] * len(units)
    turn = 0
    for index, completed in enumerate(files):
        for _ in range(len(units)):
            slot, turn = turn % len(units), turn + 1
            unit = units[slot]
            if not unit.files or (len(unit.files) < max_files
                                  and sizes[slot] + completed.size <= max_bytes):
                unit.files.append(completed)
                sizes[slot] += completed.size
                break
        else:
            return [u for u in units if u.files], files[index:]
    return [u for u in units if u.files], []


# Per-file outcomes of units still running. The upload task reports each file as it
# lands, so its offsets are released (and its registry row written) without waiting for
# the rest of its unit: a crash then re-reads only files not in Girder yet. Channels
# live in this process: a unit run elsewhere finds none, and its files settle when it
# returns, as before.
_channels: dict[str, queue.SimpleQueue] = {}
_channels_lock = threading.Lock()


def open_channel() -> str:
    """A new channel for early outcomes; its name travels with the units."""
    name = uuid.uuid4().hex
    with _channels_lock:
        _channels[name] = queue.SimpleQueue()
    return name


def report_outcome(channel: str | None, unit_id: int, outcome: FileOutcome) -> None:
    """Called by the upload task after each file; a no-op without a (local) channel."""
    target = _channels.get(channel) if channel else None
    if target is not None:
        target.put((unit_id, outcome))


def drain_channel(channel: str) -> list[tuple[int, FileOutcome]]:
    """Every ``(unit_id, outcome)`` reported since the last drain, in order."""
    source = _channels.get(channel)
    drained: list[tuple[int, FileOutcome]] = []
    while source is not None:
        try:
            drained.append(source.get_nowait())
        except queue.Empty:
            break
    return drained


def close_channel(channel: str) -> None:
    with _channels_lock:
        _channels.pop(channel, None)
        _moved.difference_update({k for k in _moved if k[0] == channel})


# Units in flight when partitions were revoked: the new owner may upload their files at
# the same moment, so their uploads must check for twins although the group was not
# shared when they started. Kept by (channel, unit id), as a running task may hold a
# copy of the unit, not the loop's object.
_moved: set[tuple[str | None, int]] = set()


def mark_moved(unit: UploadUnit) -> None:
    """Called by the loop when partitions are revoked while ``unit`` is uploading."""
    unit.shared = True
    with _channels_lock:
        _moved.add((unit.channel, unit.unit_id))


def is_shared(unit: UploadUnit) -> bool:
    """Whether ``unit``'s uploads must check for twins now (see :meth:`GirderStore.upload`)."""
    return unit.shared or (unit.channel, unit.unit_id) in _moved
