"""Streamed uploads of big files into Girder while their chunks arrive.

Girder's chunked upload (``POST /file`` with the file's size, then ``POST /file/chunk``
in order from offset 0, each chunk but the last at least 5 MiB) finalizes the file by
itself when the last byte arrives. The OpenMSIStream wire format carries no file size,
so a streamed upload can open only once the file's last chunk is in (its offset plus its
size is the size); from then on, the in-order prefix is sent as it grows, in blocks of
``STREAM_BLOCK``, by this session's own thread (the poll loop only nudges it, never
waits). The bytes from the last chunk's offset on are held back: Girder never holds a
whole file whose sha512 was not checked. The finishing step (:meth:`StreamSession.finish`,
run by the ``upload-to-girder`` task, with its retries) sends the rest once the
reassembler verified the file, then sets the item's metadata.

Skip-identical is checked before opening: a Girder item of that name holding one file
with this sha512 (or any file: skipped or replaced by :meth:`GirderStore.upload`'s own
rules) means nothing is streamed; the finishing step then runs the usual upload. So
does an item another consumer of the group created first (twins: only the oldest item
survives, as for uploads at completion).

While unfinished, the item carries ``TAG_FIELD: <group id>`` in its metadata, and the
upload's parent is that item: that is how a later run recognises what an earlier run of
the group left (an item without a file, tagged or not, is reused, and the unfinished
uploads below it are removed: ``GET``/``DELETE /system/uploads`` need an admin key; with
another key they are left to Girder's administrator and said so in the log). On a
mismatched hash, revoked partitions or a stale file, :meth:`StreamSession.abandon`
removes the upload (``DELETE /file/upload/{id}``, allowed to the user who started it)
and the item it created.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import PurePosixPath

from girder_upload_stream import failpoints
from girder_upload_stream.assembly.reassembly import CompletedFile
from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.girder.errors import GirderTerminalError, girder_name
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.ledger.streams import StreamPlan
from girder_upload_stream.ledger.units import FileOutcome, Outcome

__all__ = ["STREAM_BLOCK", "TAG_FIELD", "SessionState", "StreamSession", "StreamingUploads"]

logger = logging.getLogger(__name__)

#: Bytes per ``POST /file/chunk``: above Girder's 5 MiB minimum chunk size, and small
#: enough that the prefix follows the reading closely.
STREAM_BLOCK = 8 << 20
#: Item metadata key marking an item whose file is still being streamed (value: group).
TAG_FIELD = "gusStreamingUpload"


class SessionState(StrEnum):
    OPENING = "opening"            # the thread looks up the item and opens the upload
    STREAMING = "streaming"        # an upload is open; the prefix is being sent
    NOT_STREAMED = "not_streamed"  # found in Girder, a twin's, or no upload: upload whole
    BROKEN = "broken"              # a request failed: the finishing step uploads whole
    FINISHED = "finished"
    ABANDONED = "abandoned"


class StreamSession:
    """One file's streamed upload; its thread opens the upload and sends the prefix."""

    def __init__(self, store: GirderStore, plan: StreamPlan, group_id: str,
                 on_open: Callable[[int], None] = lambda delta: None) -> None:
        self.store, self.plan, self.group_id = store, plan, group_id
        self._on_open = on_open  # +1 when an upload opens, -1 when it is closed
        self.state = SessionState.OPENING
        self.item_id: str | None = None
        self.upload_id: str | None = None
        self.created_item = False
        self.sent = 0  # bytes Girder acknowledged
        self.error: Exception | None = None
        self.abandoning: threading.Thread | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"gus-stream-{plan.rel_path[-40:]}")
        self._thread.start()

    # -- the poll loop's side (never blocks) ------------------------------------------
    def nudge(self) -> None:
        """More of the prefix may be there: wake the thread."""
        with self._cond:
            self._cond.notify_all()

    def abandon(self) -> None:
        """Give up: the thread stops and removes the upload and the item it created (on
        a thread of its own; :meth:`StreamingUploads.wait` waits for it at the end)."""
        self.abandoning = threading.Thread(target=self._abandon, daemon=True,
                                           name="gus-stream-abandon")
        self.abandoning.start()

    # -- the session's thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open()
            while self.state is SessionState.STREAMING and not self._stopping():
                if not self._send_some():
                    with self._cond:
                        if not self._stop:
                            self._cond.wait(0.5)
        except Exception as exc:  # noqa: BLE001 - Girder's (transient or terminal) or a
            # local read's: never fatal, the finishing step uploads the file whole
            logger.warning("streamed upload of %s stopped (%s); it is uploaded whole once "
                           "complete", self.plan.rel_path, exc)
            self.error, self.state = exc, SessionState.BROKEN

    def _stopping(self) -> bool:
        with self._cond:
            return self._stop

    def _open(self) -> None:
        store, plan = self.store, self.plan
        client = store._client()
        path = PurePosixPath(plan.rel_path)
        folder = store.folder_for("" if str(path.parent) == "." else str(path.parent))
        name = girder_name(path.name)
        items = store._call(lambda: list(client.listItem(folder, name=name)), "list items",
                            plan.rel_path)
        if items:
            files = store._call(lambda: list(client.listFile(items[0]["_id"])), "list files",
                                plan.rel_path)
            if files:  # identical (skipped), or different (skipped or replaced): whole
                self.state = SessionState.NOT_STREAMED
                return
            item = items[0]  # left without its file by an earlier run: reuse it
            self._remove_leftovers(item["_id"])
        else:
            item = store._call(lambda: client.createItem(
                folder, name, metadata={TAG_FIELD: self.group_id}, reuseExisting=True),
                "create item", plan.rel_path)
            self.created_item = True
            if plan.shared() and store._oldest_item(folder, name, item)["_id"] != item["_id"]:
                self.created_item = False  # ours was deleted: the twin's item is kept
                self.state = SessionState.NOT_STREAMED
                return
        self.item_id = item["_id"]
        mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        upload = store._call(lambda: client.post("file", parameters={
            "parentType": "item", "parentId": item["_id"], "name": path.name,
            "size": plan.size, "mimeType": mimetype}), "open upload", plan.rel_path)
        self.upload_id = upload["_id"]
        self._on_open(1)
        self.state = SessionState.STREAMING
        logger.info("%s: streaming into Girder while it arrives (%d bytes)", plan.rel_path,
                    plan.size)

    def _send_some(self) -> bool:
        """Send one block of the prefix if there is one (the held-back tail excluded)."""
        view = self.plan.view()
        if view is None:
            return False  # completed or dropped: the finishing step takes over
        _, prefix_end, hold_from = view
        if min(prefix_end, hold_from) - self.sent < STREAM_BLOCK:
            return False
        data = self.plan.read(self.sent, self.sent + STREAM_BLOCK)
        if not data:
            return False
        self._post_chunk(data)
        return True

    def _post_chunk(self, data: bytes) -> dict:
        client, offset = self.store._client(), self.sent
        answer = self.store._call(lambda: client.post(
            "file/chunk", parameters={"uploadId": self.upload_id, "offset": offset},
            data=data), "send chunk", self.plan.rel_path)
        self.sent += len(data)
        failpoints.hit("stream.sent")
        return answer

    def _remove_leftovers(self, item_id: str) -> None:
        """Unfinished uploads below ``item_id`` (an earlier run's): removed (admin)."""
        client = self.store._client()
        try:
            uploads = self.store._call(lambda: client.get(
                "system/uploads", parameters={"parentId": item_id}), "list uploads",
                self.plan.rel_path)
        except GirderTerminalError as exc:
            logger.warning("%s: cannot list the unfinished uploads an earlier run left "
                           "(%s): the key is not an administrator's; Girder's administrator "
                           "can remove them (DELETE /system/uploads)", self.plan.rel_path, exc)
            return
        for upload in uploads:
            self._cancel(upload["_id"])

    def _cancel(self, upload_id: str) -> None:
        client = self.store._client()
        self.store._call(lambda: client.delete(f"file/upload/{upload_id}"), "cancel upload",
                         self.plan.rel_path)
        if upload_id == self.upload_id:
            self._on_open(-1)

    def _stop_thread(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _abandon(self) -> None:
        self._stop_thread()
        if self.state in (SessionState.FINISHED, SessionState.ABANDONED):
            return
        self.state = SessionState.ABANDONED
        try:
            if self.upload_id is not None:
                self._cancel(self.upload_id)
            if self.item_id is not None and self._removable(self.item_id):
                client = self.store._client()
                self.store._call(lambda: client.delete(f"item/{self.item_id}"),
                                 "delete item", self.plan.rel_path)
            logger.info("%s: streamed upload abandoned and removed from Girder",
                        self.plan.rel_path)
        except GirderUploadStreamError as exc:
            logger.warning("%s: could not remove the abandoned upload (%s); the next run "
                           "of the group removes it when it uploads this file",
                           self.plan.rel_path, exc)

    def _removable(self, item_id: str) -> bool:
        """The item we streamed into, if it holds no file: a mismatched or abandoned file
        leaves no item (one with a file -- a twin's, finished -- is never deleted)."""
        client = self.store._client()
        files = self.store._call(lambda: list(client.listFile(item_id)), "list files",
                                 self.plan.rel_path)
        return not files

    # -- the finishing step (the upload task's thread) ------------------------------
    def finish(self, completed: CompletedFile, shared: Callable[[], bool]) -> FileOutcome:
        """The verified file: send what is left and set the metadata; or, when nothing
        was streamed (or the stream broke), upload it whole. Transient errors raise (the
        task retries: the next call resumes at Girder's offset)."""
        self._stop_thread()
        if self.state is SessionState.STREAMING:
            try:
                return self._finish_stream(completed, shared)
            except GirderTerminalError as exc:
                logger.warning("%s: finishing the streamed upload failed (%s); uploading "
                               "it whole", completed.rel_path, exc)
                self.state = SessionState.BROKEN
        if self.upload_id is not None and self.state is not SessionState.FINISHED:
            try:
                self._cancel(self.upload_id)
            except GirderTerminalError:
                pass  # gone already
            self.upload_id = None
        outcome = self.store.upload(completed, shared=shared)
        self.state = SessionState.FINISHED
        return outcome

    def _finish_stream(self, completed: CompletedFile, shared: Callable[[], bool]
                       ) -> FileOutcome:
        client = self.store._client()
        answer = self.store._call(lambda: client.get(
            "file/offset", parameters={"uploadId": self.upload_id}), "upload offset",
            completed.rel_path)
        self.sent = int(answer["offset"])
        stream = (completed.data.open() if completed.data is not None
                  else open(completed.path, "rb"))  # noqa: SIM115 - closed below
        with stream:
            stream.seek(self.sent)
            while self.sent < completed.size:
                self._post_chunk(stream.read(min(STREAM_BLOCK, completed.size - self.sent)))
        self._on_open(-1)  # finalized by its last byte
        meta = {**self.store._meta(completed.sha256), TAG_FIELD: None}  # null: key removed
        self.store._call(lambda: client.addMetadataToItem(self.item_id, meta), "set metadata",
                         completed.rel_path)
        self.state = SessionState.FINISHED
        if shared():
            self._keep_oldest_file(completed)
        return FileOutcome(completed.rel_path, completed.file_key, Outcome.UPLOADED,
                           item_id=self.item_id)

    def _keep_oldest_file(self, completed: CompletedFile) -> None:
        """Of identical files in our item (a twin uploaded into it too), keep the oldest."""
        client = self.store._client()
        files = self.store._call(lambda: list(client.listFile(self.item_id)), "list files",
                                 completed.rel_path)
        same = sorted(f["_id"] for f in files if f.get("size") == completed.size)
        for extra in same[1:]:
            self.store._call(lambda: client.delete(f"file/{extra}"), "delete duplicate file",
                             completed.rel_path)

    def close(self, timeout: float) -> None:
        """At shutdown: stop the thread (bounded); an open upload is abandoned."""
        if self.state in (SessionState.OPENING, SessionState.STREAMING):
            self._abandon_now(timeout)

    def _abandon_now(self, timeout: float) -> None:
        worker = threading.Thread(target=self._abandon, daemon=True)
        worker.start()
        worker.join(timeout)


class StreamingUploads:
    """Opens one :class:`StreamSession` per big file (the processor's ``open_stream``)."""

    def __init__(self, store: GirderStore, group_id: str) -> None:
        self.store, self.group_id = store, group_id
        self.sessions: list[StreamSession] = []
        self.open_now = self.max_open = 0  # Girder uploads open at once (the benchmarks')
        self._lock = threading.Lock()

    def _count(self, delta: int) -> None:
        with self._lock:
            self.open_now += delta
            self.max_open = max(self.max_open, self.open_now)

    @property
    def opened(self) -> int:
        return len(self.sessions)

    def __call__(self, plan: StreamPlan) -> StreamSession:
        session = StreamSession(self.store, plan, self.group_id, self._count)
        self.sessions.append(session)
        return session

    def wait(self, timeout: float = 10.0) -> None:
        """At the end of the run: let the removals of abandoned uploads finish (bounded),
        so that a mismatched file leaves nothing in Girder when the process exits."""
        for session in self.sessions:
            if session.abandoning is not None:
                session.abandoning.join(timeout)
