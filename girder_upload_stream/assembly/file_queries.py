"""What the rest of the consumer asks the :class:`~girder_upload_stream.assembly.reassembly.Reassembler`
about one file generation, and the two ways it tells it to forget one: a mixin working on
the reassembler's own groups, finished keys and lock (kept apart so that the module that
adds chunks stays about adding them)."""

from __future__ import annotations

from collections import OrderedDict

from girder_upload_stream.assembly.candidates import Group
from girder_upload_stream.shared_types import FileProgress
from girder_upload_stream.wire.codec import FileKey

__all__ = ["FileQueries"]


class FileQueries:
    """Look-ups of files in progress, parked or finished, and forgetting them."""

    _files: dict[FileKey, Group]
    _parked: OrderedDict[FileKey, Group]
    _finished: OrderedDict[FileKey, str]

    def assembly(self, file_key: FileKey) -> Group | None:
        """The competing candidates of a generation being assembled (for its ledger
        record to hold), else None."""
        return self._files.get(file_key)

    def discard(self, file_key: FileKey) -> bool:
        """Forget a file in progress (and its partial file) or a finished key; True if known."""
        with self._lock:
            if self._forget(file_key):
                return True
            return self._finished.pop(file_key, None) is not None

    def begun(self) -> list[FileKey]:
        """The generations a chunk of which would begin no new file under the bound of
        files in progress: those being assembled, and parked ones."""
        with self._lock:
            return [*self._files, *self._parked]

    def is_completed(self, file_key: FileKey) -> bool:
        """True if this generation completed (and is still remembered)."""
        with self._lock:
            return self._finished.get(file_key) == ""

    def received(self, file_key: FileKey) -> list[int] | None:
        """Chunk numbers received so far of a generation being assembled (of its
        leading chunking), else None."""
        with self._lock:
            group = self._files.get(file_key)
            return None if group is None else list(group.lead.pieces)

    def mark_finished(self, file_key: FileKey) -> None:
        """Treat a generation as completed elsewhere (e.g. found in Girder): drop its
        partial state and recognise its later chunks as duplicates."""
        with self._lock:
            self._forget(file_key)
            self._remember(file_key, "")

    def progress(self, file_key: FileKey) -> FileProgress | None:
        """The :class:`FileProgress` of one generation being assembled, or None."""
        with self._lock:
            group = self._files.get(file_key)
            return None if group is None else group.progress()

    def in_progress(self) -> list[FileProgress]:
        """One :class:`FileProgress` per file generation still being assembled."""
        with self._lock:
            return [g.progress() for g in self._files.values()]
