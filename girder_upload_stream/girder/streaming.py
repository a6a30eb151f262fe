"""Streamed uploads of big files into Girder while their chunks arrive.

Girder's chunked upload (``POST /file`` with the file's size, then ``POST /file/chunk``
in order from offset 0, each chunk but the last at least 5 MiB) finalizes the file by
itself when the last byte arrives. The OpenMSIStream wire format carries no file size,
so a streamed upload can open only once the file's last chunk is in (its offset plus its
size is the size) and bytes from offset 0 agree with it (see
:func:`~girder_upload_stream.ledger.streams.wants_stream`); nothing is made in Girder
before the in-order prefix holds a whole ``STREAM_BLOCK`` to send (or everything before
the last chunk). From then on, the prefix is sent as it grows, in blocks of
``STREAM_BLOCK``, by this session's own thread (the poll loop only nudges it, never
waits). The bytes from the last chunk's offset on are held back: Girder never holds a
whole file whose sha512 was not checked. The finishing step (:meth:`StreamSession.finish`,
run by the ``upload-to-girder`` task, with its retries) sends the rest once the
reassembler verified the file, then sets the item's metadata.

Only into an item of the consumer's own (see
:mod:`~girder_upload_stream.girder.ownership`): a Girder item of that name holding a
file (identical: skipped; different: skipped or replaced by :meth:`GirderStore.upload`'s
own rules), or one without a file that someone else made, means nothing is streamed;
the finishing step then runs the usual upload. So does an item another consumer of the
group created first (twins: only the oldest item survives, as for uploads at
completion), and a name Girder would change (a folder of that name is there).

While unfinished, the item carries the owner mark and ``TAG_FIELD: <group id>`` in its
metadata, and the upload's parent is that item: that is how a later run recognises what
an earlier one left (an item of the consumer's without a file is reused, and the
unfinished uploads below it are removed: ``GET``/``DELETE /system/uploads`` need an
admin key; with another key they are left to Girder's administrator and said so in the
log). On a mismatched hash, revoked partitions or a stale file,
:meth:`StreamSession.abandon` removes the upload (``DELETE /file/upload/{id}``, allowed
to the user who started it), the item (the consumer's, still without a file) and the
sub-folders made for it that are left empty (unless another consumer of the group may
upload into them now). A verified file whose size is not the one the upload was opened
with is uploaded whole instead.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import PurePosixPath

from girder_upload_stream import failpoints
from girder_upload_stream.shared_types import CompletedFile, FileOutcome, Outcome, StreamPlan
from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.girder.errors import GirderTerminalError, girder_name
from girder_upload_stream.girder.ownership import TAG_FIELD
from girder_upload_stream.girder.store import GirderStore, item_was_there

__all__ = ["STREAM_BLOCK", "SEND_SLOTS", "TAG_FIELD", "SessionState", "StreamSession", "StreamingUploads"]

logger = logging.getLogger(__name__)

#: Bytes per ``POST /file/chunk``: above Girder's 5 MiB minimum chunk size, and small
#: enough that the prefix follows the reading closely.
STREAM_BLOCK = 8 << 20
#: Blocks being read and sent at once over every stream of a run: what the memory plan
#: sets aside for them (memory_plan.py), whatever the number of streams open.
SEND_SLOTS = 2


class SessionState(StrEnum):
    OPENING = "opening"            # waits for a block of the prefix, then opens the upload
    STREAMING = "streaming"        # an upload is open; the prefix is being sent
    NOT_STREAMED = "not_streamed"  # found in Girder, a twin's, or no upload: upload whole
    BROKEN = "broken"              # a request failed: the finishing step uploads whole
    FINISHED = "finished"
    ABANDONED = "abandoned"


class StreamSession:
    """One file's streamed upload; its thread opens the upload and sends the prefix."""

    def __init__(self, store: GirderStore, plan: StreamPlan, group_id: str,
                 on_open: Callable[[int], None] = lambda delta: None,
                 slots: threading.Semaphore | None = None) -> None:
        self.store, self.plan, self.group_id = store, plan, group_id
        self._slots = slots or threading.Semaphore(1)  # the run's SEND_SLOTS
        self._on_open = on_open  # +1 when an upload opens, -1 when it is closed
        self.state = SessionState.OPENING
        self.item_id: str | None = None
        self.upload_id: str | None = None
        self.created_item = False
        self._held: str | None = None  # the sub-folder held while the item may be made
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

    def drains_to(self) -> int:
        """The end of the prefix this upload sends (and lets go of) without another
        message: the whole blocks of the prefix held, up to the held-back tail, while
        the upload is open or opening; 0 otherwise (nothing would leave RAM by waiting)."""
        if self.state not in (SessionState.OPENING, SessionState.STREAMING) or self._stop:
            return 0
        view = self.plan.view()
        if view is None or view[0] != self.plan.size or view[2] < 0:
            return 0
        sent, ready = self.sent, min(view[1], view[2])
        blocks = max(0, ready - sent) // STREAM_BLOCK
        return sent + blocks * STREAM_BLOCK if blocks else 0

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

    def _evidence(self) -> bool | None:
        """Whether the prefix in hand holds a block to send (or all before the last
        chunk), in agreement with the planned size; None: no longer assembling."""
        view = self.plan.view()
        if view is None:
            return None
        size, prefix_end, hold_from = view
        return size == self.plan.size and 0 <= hold_from and \
            prefix_end >= min(STREAM_BLOCK, hold_from)

    def _wait_for_evidence(self) -> bool:
        """Wait (woken by nudges) until the prefix in hand justifies an upload in Girder;
        False when the file stops assembling (completed, dropped) or the session stops."""
        while not self._stopping():
            evidence = self._evidence()
            if evidence is None:
                return False
            if evidence:
                return True
            with self._cond:
                if not self._stop:
                    self._cond.wait(0.5)
        return False

    def _open(self) -> None:
        if not self._wait_for_evidence():
            self.state = SessionState.NOT_STREAMED
            return
        store, plan = self.store, self.plan
        client = store._client()
        path = PurePosixPath(plan.rel_path)
        subdir = "" if str(path.parent) == "." else str(path.parent)
        folder = store.hold_folder(subdir, plan.shared)
        self._held = subdir
        name = girder_name(path.name)
        item = self._own_item(folder, name)
        if item is None:
            self.state = SessionState.NOT_STREAMED
            self._release()
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

    def _own_item(self, folder: str, name: str) -> dict | None:
        """The item to stream into: one of the consumer's left without a file by an
        earlier run, or a new one (marked); None when there is another item of that
        name, a twin made first by another consumer, or a folder of that name."""
        store, plan = self.store, self.plan
        client, owner = store._client(), store._owner()
        items = store._call(lambda: list(client.listItem(folder, name=name)), "list items",
                            plan.rel_path)
        if items:
            files = store._call(lambda: list(client.listFile(items[0]["_id"])), "list files",
                                plan.rel_path)
            if files or not owner.owns(items[0]):
                return None  # identical, different or someone else's: uploaded whole
            self._remove_leftovers(items[0]["_id"])
            return items[0]
        item = store._call(lambda: client.createItem(
            folder, name, metadata={**owner.mark(), TAG_FIELD: self.group_id}),
            "create item", plan.rel_path)
        if item_was_there(item, name):  # another item made since, or a folder: not ours
            store._delete_empty_item(item, plan.rel_path)
            return None
        self.created_item = True
        if plan.shared() and store._oldest_item(folder, name, item)["_id"] != item["_id"]:
            self.created_item = False  # ours was deleted: the twin's item is kept
            return None
        return item

    def _release(self) -> None:
        """The sub-folder is no longer held; pruned of empty folders if the file did not
        land (and no other consumer of the group may upload into them now)."""
        subdir, self._held = self._held, None
        if subdir is None:
            return
        self.store.release_folder(subdir)
        if subdir and self.state is SessionState.ABANDONED and not self.plan.shared():
            self.store.prune_folders(subdir)

    def _send_some(self) -> bool:
        """Send one block of the prefix if there is one (the held-back tail excluded)."""
        view = self.plan.view()
        if view is None:
            return False  # completed or dropped: the finishing step takes over
        _, prefix_end, hold_from = view
        if min(prefix_end, hold_from) - self.sent < STREAM_BLOCK:
            return False
        with self._slots:
            data = self.plan.read(self.sent, self.sent + STREAM_BLOCK)
            if not data:
                return False
            self._post_chunk(data)
            del data
        self.plan.let_go(self.sent)  # Girder holds them: RAM need not (see finish)
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
            if self.upload_id is not None or self.item_id is not None:
                logger.info("%s: streamed upload abandoned and removed from Girder",
                            self.plan.rel_path)
        except GirderUploadStreamError as exc:
            logger.warning("%s: could not remove the abandoned upload (%s); the next run "
                           "of the group removes it when it uploads this file",
                           self.plan.rel_path, exc)
        self._release()

    def _removable(self, item_id: str) -> bool:
        """The item we streamed into, if it is still the consumer's and holds no file: a
        mismatched or abandoned file leaves no item (one with a file -- a twin's,
        finished -- is never deleted, nor one that is not the consumer's)."""
        client, rel = self.store._client(), self.plan.rel_path
        item = self.store._call(lambda: client.getItem(item_id), "get item", rel)
        return self.store._owner().owns(item) and not self.store._call(
            lambda: list(client.listFile(item_id)), "list files", rel)

    # -- the finishing step (the upload task's thread) ------------------------------
    def finish(self, completed: CompletedFile, shared: Callable[[], bool]) -> FileOutcome:
        """The verified file: send what is left and set the metadata; or, when nothing
        was streamed (or the stream broke), upload it whole. Transient errors raise (the
        file is tried again later: the next call resumes at Girder's offset)."""
        self._stop_thread()
        self._release()
        if self.state is SessionState.STREAMING and completed.size != self.plan.size:
            logger.warning("%s: verified with %d bytes, not the %d its upload was opened "
                           "with; uploading it whole", completed.rel_path, completed.size,
                           self.plan.size)
            self.state = SessionState.BROKEN
        if completed.held_from and self.state is SessionState.BROKEN \
                and self.upload_id is not None:
            self.state = SessionState.STREAMING  # the only way left: resume at Girder's offset
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
        if completed.held_from:
            raise GirderTerminalError(
                f"the streamed upload broke after its first {completed.held_from} bytes "
                "were sent and let go; the file is rebuilt from its messages",
                rel_path=completed.rel_path)
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
        if self.sent < completed.held_from:  # Girder lost bytes we let go of
            raise GirderTerminalError(f"Girder's upload is at {self.sent} bytes, before the "
                                      f"{completed.held_from} let go", rel_path=completed.rel_path)
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
        self._slots = threading.Semaphore(SEND_SLOTS)

    def _count(self, delta: int) -> None:
        with self._lock:
            self.open_now += delta
            self.max_open = max(self.max_open, self.open_now)

    @property
    def opened(self) -> int:
        return len(self.sessions)

    def __call__(self, plan: StreamPlan) -> StreamSession:
        session = StreamSession(self.store, plan, self.group_id, self._count, self._slots)
        self.sessions.append(session)
        return session

    def wait(self, timeout: float = 10.0) -> None:
        """At the end of the run: let the removals of abandoned uploads finish (bounded),
        so that a mismatched file leaves nothing in Girder when the process exits."""
        for session in self.sessions:
            if session.abandoning is not None:
                session.abandoning.join(timeout)
