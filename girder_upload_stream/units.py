"""What travels between the polling loop and the upload tasks.

An :class:`UploadUnit` groups completed files so that many small files cost one Prefect
task run (the local Prefect server records only ~45 task runs per second); a retry
re-runs the whole unit, which is safe because uploads skip identical content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from girder_upload_stream.codec import FileKey
from girder_upload_stream.reassembly import CompletedFile

__all__ = ["Outcome", "FileOutcome", "UploadUnit", "group_into_units"]


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

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def file_keys(self) -> list[FileKey]:
        return [(f.rel_path, f.file_hash) for f in self.files]


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
