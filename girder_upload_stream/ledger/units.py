"""What travels between the polling loop and the upload tasks.

An :class:`UploadUnit` groups completed files so that many small files cost one Prefect
task run (the local Prefect server records only ~45 task runs per second). A unit runs
once; the files of it that failed transiently are packed into new units when their
retry is due (retry_policy.py), which is safe because uploads skip identical content.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from girder_upload_stream.shared_types import CompletedFile, FileOutcome
from girder_upload_stream.wire.codec import FileKey

__all__ = ["UploadUnit", "group_into_units", "stripe_into_units", "UploadChannel",
           "report_outcome", "mark_moved", "is_shared", "items_shared"]


@dataclass
class UploadUnit:
    unit_id: int
    files: list[CompletedFile] = field(default_factory=list)
    #: Where the task reports each file's outcome as soon as it lands (see
    #: :class:`UploadChannel`); None: the outcomes come only with the unit's result.
    channel: UploadChannel | None = None
    #: Another consumer of the group may upload the same files now (see
    #: :meth:`GirderStore.upload`); set by the loop from the group's state.
    shared: bool = False
    #: Though the group is shared, no other member can be uploading these very files
    #: (kafka/gain_marks.py): their items need no twin check, their folders still do.
    #: Set by the loop; a revoke (:func:`mark_moved`) overrides it.
    alone: bool = False
    #: Files of the unit whose upload was streamed while they arrived: their session
    #: (girder/streaming.py), which sends the rest and sets the metadata.
    streams: dict[FileKey, Any] = field(default_factory=dict)
    #: Files of the unit the registries list as in Girder already (produced again, or
    #: read again after a run that listed them was killed before its commit): their
    #: item is looked up before any ``POST item`` (see :meth:`GirderStore.upload`).
    known_there: set[FileKey] = field(default_factory=set)

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


class UploadChannel:
    """What one flow run's loop and its upload tasks share: each file's outcome as soon
    as it lands (so its offsets are released, and its registry row written, without
    waiting for the rest of its unit: a crash then re-reads only files not in Girder
    yet), and the units in flight when partitions were revoked.

    The flow run owns it and hands it to each unit; it is a plain object, so a task
    runner that rebuilds the unit's dataclass still holds the same channel."""

    def __init__(self) -> None:
        self._outcomes: queue.SimpleQueue[tuple[int, FileOutcome]] = queue.SimpleQueue()
        self._moved: set[int] = set()
        self._lock = threading.Lock()

    def report(self, unit_id: int, outcome: FileOutcome) -> None:
        """Called by the upload task after each file."""
        self._outcomes.put((unit_id, outcome))

    def drain(self) -> list[tuple[int, FileOutcome]]:
        """Every ``(unit_id, outcome)`` reported since the last drain, in order."""
        drained: list[tuple[int, FileOutcome]] = []
        while True:
            try:
                drained.append(self._outcomes.get_nowait())
            except queue.Empty:
                return drained

    def moved(self, unit_id: int) -> None:
        with self._lock:
            self._moved.add(unit_id)

    def was_moved(self, unit_id: int) -> bool:
        with self._lock:
            return unit_id in self._moved


def report_outcome(unit: UploadUnit, outcome: FileOutcome) -> None:
    """Called by the upload task after each file; a no-op for a unit without channel."""
    if unit.channel is not None:
        unit.channel.report(unit.unit_id, outcome)


def mark_moved(unit: UploadUnit) -> None:
    """Called by the loop when partitions are revoked while ``unit`` is uploading: the
    new owner may upload its files at the same moment, so its uploads must check for
    twins although the group was not shared when they started. Kept on the channel, as
    a running task may hold a copy of the unit, not the loop's object."""
    unit.shared, unit.alone = True, False
    if unit.channel is not None:
        unit.channel.moved(unit.unit_id)


def is_shared(unit: UploadUnit) -> bool:
    """Whether ``unit``'s uploads must check for twins now (see :meth:`GirderStore.upload`):
    the folders they create, and the items unless :func:`items_shared` says otherwise."""
    return unit.shared or _was_moved(unit)


def items_shared(unit: UploadUnit) -> bool:
    """Whether the items of ``unit``'s files must be checked for twins now: as
    :func:`is_shared`, except for files no other member can be uploading (``alone``)
    while their partitions have not moved since."""
    if _was_moved(unit):
        return True
    return unit.shared and not unit.alone


def _was_moved(unit: UploadUnit) -> bool:
    return unit.channel is not None and unit.channel.was_moved(unit.unit_id)
