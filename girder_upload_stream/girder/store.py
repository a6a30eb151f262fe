"""Every girder-client call of the project lives here.

A :class:`GirderStore` logs in and resolves the root folder (:meth:`GirderStore.check`,
before anything is consumed; again when Girder says it is gone), mirrors sub-folders
below it (created once and cached, not looked up per file), and uploads one item per
file with its metadata; what it creates carries the consumer's owner mark, and only
that is ever deleted, emptied or filled (:mod:`~girder_upload_stream.girder.ownership`). Re-delivered
files are harmless: an item of the same name whose checksum matches is skipped, which
is what makes uploads effectively-once. Names are those Girder stores (stripped of
leading and trailing white space), so that a lookup finds what a create made.

A new small file costs two requests (see :meth:`GirderStore._upload`): ``POST item``
with its metadata, then ``POST file`` carrying the whole file in its body (Girder
finishes an upload whose first chunk is the whole file). Whether an item of the name
was there already is read from that first answer (Girder renames a new item whose name
is taken), so nothing is looked up per file unless it was; only then, and when another
consumer of the group may be uploading the same file (``shared``), are there more.

Library errors become :class:`GirderTransientError` (retry: connection errors, 429,
5xx), :class:`GirderAuthError` (a transient one: the key or its token was refused; the
client logs in again) or :class:`GirderTerminalError` (record and move on: other 4xx,
such as 403 or an invalid name). Their texts never carry the API key: it travels in a
request body, never a URL, and every library text is masked (see
:mod:`girder_upload_stream.girder.errors`).
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, TypeVar

from girder_upload_stream import __version__, failpoints
from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.girder.existing import ExistingItemMixin
from girder_upload_stream.girder.folders import FolderMixin
from girder_upload_stream.girder.errors import (LOGIN, GirderAuthError, GirderRootFolderGone,
                                                GirderStartupError, GirderTerminalError,
                                                GirderTransientError, GirderUnknownIdError,
                                                girder_name, translate)
from girder_upload_stream.girder.ownership import OWNER_FIELD, Owner
from girder_upload_stream.request_tally import note_request
from girder_upload_stream.shared_types import CompletedFile, FileOutcome, Outcome
from girder_upload_stream.settings import GirderSettings

__all__ = ["VERSION_FIELD", "VERSION_VALUE", "SMALL_UPLOAD_BYTES", "GirderTransientError",
           "GirderTerminalError", "GirderAuthError", "GirderStartupError", "GirderRootFolderGone",
           "GirderStore", "girder_name", "item_was_there", "OWNER_FIELD"]

logger = logging.getLogger(__name__)

#: OpenMSIStream's key, kept so downstream queries on it keep working; the value names
#: this program and its version instead of an OpenMSIStream release.
VERSION_FIELD = "OpenMSIStreamVersion"
VERSION_VALUE = f"girder-upload-stream {__version__}"
#: Files up to this size travel in the body of the ``POST file`` that starts their
#: upload (one request; Girder's CherryPy accepts bodies up to 100 MiB, girder-client
#: does the same up to 64 MiB); larger ones go through ``POST file/chunk`` requests.
SMALL_UPLOAD_BYTES = 32 << 20
T = TypeVar("T")
#: Bytes girder-client reads per upload request of a whole file (its default, 64 MiB,
#: held one block per upload worker, is RAM the memory budget does not see).
UPLOAD_BLOCK_BYTES = 16 << 20


class _StaleFolder(GirderTerminalError):
    """Girder no longer knows a cached folder (deleted since): re-resolve and retry."""


def _asker(shared: bool | Callable[[], bool]) -> Callable[[], bool]:
    """A twin-check answer asked at each check (a callable is kept as it is)."""
    return shared if callable(shared) else (lambda: bool(shared))


def item_was_there(created: dict, name: str) -> bool:
    """Whether ``created``, the answer to ``POST item`` (without ``reuseExisting``) for
    ``name``, says a sibling of that name was there: Girder then saves the new item as
    ``name (1)``. A new item named as asked means there was none (or a twin is being
    made at this very moment by another consumer: see ``shared``)."""
    return created.get("name") != name


class GirderStore(ExistingItemMixin, FolderMixin):
    """Uploads completed files below one root folder; thread-safe (one client per thread)."""

    def __init__(self, settings: GirderSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._local = threading.local()
        self._folders: dict[str, str] = {}
        self._folder_lock = threading.Lock()
        self._busy: dict[str, int] = {}  # sub-folder key -> uploads using it now
        self.owner: Owner | None = None  # the API key's user, known at the first log-in
        self._token: str | None = None  # shared by the threads' clients
        self._token_lock = threading.Lock()
        self.requests = 0

    # -- plumbing ------------------------------------------------------------------
    def _client(self):
        """This thread's client, logged in (a new log-in after an authentication error)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from girder_client import GirderClient
            client = GirderClient(apiUrl=self.settings.api_url)
            client.MAX_CHUNK_SIZE = UPLOAD_BLOCK_BYTES
            # One keep-alive connection per thread, for the client's life (girder-client's
            # own session, entered and kept): with a remote Girder every request would
            # otherwise pay a new TCP (and TLS) set-up, a round trip or more.
            self._local.session = client.session()
            self._local.session.__enter__()
            client.setToken(self._token_for_threads(client))
            self._local.client = client
        return client

    def _token_for_threads(self, client: Any) -> str:
        """The token every thread's client uses: one log-in (one round trip to a remote
        Girder) for the run rather than one per upload thread; after an authentication
        error (:meth:`_call` forgets the token) the next thread logs in again."""
        with self._token_lock:
            if self._token is None:
                self._call(lambda: self._login(client), LOGIN)
                self._token = client.token
            return self._token

    def _login(self, client: Any) -> None:
        # girder-client's authenticate() puts the key in the URL's query string, which
        # connection errors, proxies and access logs quote; a form body they do not.
        answer = client.sendRestRequest(
            "POST", "api_key/token", data={"key": self.settings.api_key.get_secret_value()})
        client.setToken(answer["authToken"]["token"])
        user_id = (answer.get("user") or {}).get("_id")
        if user_id and self.owner is None:
            self.owner = Owner(str(user_id))

    def _owner(self) -> Owner:
        """The consumer's identity in Girder (logs in first if no thread has yet)."""
        if self.owner is None:
            self._client()
        if self.owner is None:
            raise GirderTerminalError("Girder did not say which user the API key is")
        return self.owner

    def _call(self, fn: Callable[[], T], what: str, rel_path: str | None = None) -> T:
        self.requests += 1
        note_request()
        try:
            return fn()
        except Exception as exc:
            failure = translate(exc, what, rel_path, (self.settings.api_key.get_secret_value(),))
            if failure is None:
                raise
        if isinstance(failure, GirderAuthError):
            self._local.client = None  # log in again at this thread's next request
            self._token = None
        # Raised outside the except block: the library's exception, whose text may quote
        # a URL with credentials, is neither chained nor shown in a traceback.
        raise failure

    def _meta(self, sha256: str | None = None, created: bool = False) -> dict[str, Any]:
        """The metadata of an item (with ``sha256``) or folder; ``created``: one the
        consumer creates now, which also gets its owner mark (see ownership.py)."""
        meta: dict[str, Any] = {**self.settings.metadata, VERSION_FIELD: VERSION_VALUE,
                                "KafkaTopic": self.topic}
        if sha256 is not None:
            meta["checksum"] = {"sha256": sha256}
        meta.pop(OWNER_FIELD, None)  # only ever set here, never from --metadata
        if created:
            meta.update(self._owner().mark())
        return meta

    # -- folders -------------------------------------------------------------------
    def check(self) -> str:
        """Log in and resolve the root folder, before anything is consumed: the id of
        the root folder, or :class:`GirderStartupError` with a one-line reason."""
        try:
            return self.root_folder_id()
        except GirderAuthError as exc:
            reason = f"it did not accept the API key ({exc})"
        except GirderUploadStreamError as exc:
            reason = str(exc)
        raise GirderStartupError(f"cannot start: Girder at {self.settings.api_url}: {reason}")

    # -- items ---------------------------------------------------------------------
    def holds(self, rel_path: str, file_hash: bytes) -> bool | None:
        """Whether Girder already has this generation of ``rel_path`` (same name, one
        file whose sha512 is ``file_hash``): the restart check of a re-read file.

        None when it cannot tell now (Girder unreachable); False also when the stored
        file has no sha512 (an assetstore that does not hash) -- it is then rebuilt.
        Makes nothing in Girder (a missing folder means the file is not there)."""
        path = PurePosixPath(rel_path)
        subdir = "" if str(path.parent) == "." else str(path.parent)
        try:
            client = self._client()
            name = girder_name(path.name)
            folder = self.existing_folder(subdir)
            if folder is None:
                return False  # its folder is not there: neither is the file
            items = self._call(lambda: list(client.listItem(folder, name=name)),
                               "list items", rel_path)
            for item in items:
                files = self._call(lambda: list(client.listFile(item["_id"])), "list files",
                                   rel_path)
                if len(files) == 1 and files[0].get("sha512") == file_hash.hex():
                    self._sweep_after_lookup(folder, name, item, rel_path)
                    return True
        except GirderTransientError as exc:
            logger.warning("cannot look up %s in Girder now: %s", rel_path, exc)
            return None
        except GirderTerminalError as exc:
            logger.warning("cannot look up %s in Girder: %s", rel_path, exc)
        return False

    def upload(self, completed: CompletedFile, shared: bool | Callable[[], bool] = False,
               known_there: bool = False,
               folders_shared: bool | Callable[[], bool] | None = None) -> FileOutcome:
        """Put one file in Girder, or say why not. Never raises for terminal problems.

        ``shared``: another consumer of the group may be uploading the same file now
        (the group has other members, or partitions moved lately): the item and its
        file (and folders created now) are then checked for twins after they are made,
        which costs two requests. A callable is asked at each check, so partitions
        revoked during the upload still count. ``folders_shared`` (default: as
        ``shared``) is the same for the folders created now: in a group re-keyed by file
        no other member uploads this very file, but files of one folder reach several
        members (kafka/gain_marks.py).

        ``known_there``: the registries list this file as in Girder (a new production
        of it, or a re-read after a run listed it and was killed before its commit).
        Its item is then looked up first: a ``POST item`` would only be renamed, and a
        run killed before deleting that renamed item would leave it for good (no later
        reading of the file comes to Girder: the registry settles it).

        A cached folder Girder no longer knows (deleted by someone) is resolved again,
        the root folder included, and the file tried once more. A file that fails for
        good leaves none of the empty folders the consumer made for it."""
        check = _asker(shared)
        folders = check if folders_shared is None else _asker(folders_shared)
        key = completed.file_key
        if completed.held_from:  # its streamed upload was abandoned after the let-go
            return FileOutcome(completed.rel_path, key, Outcome.FAILED_TERMINAL, (
                f"its first {completed.held_from} bytes were streamed and let go, and that "
                "upload was abandoned; the file is rebuilt from its messages"))
        path = PurePosixPath(completed.rel_path)
        subdir = "" if str(path.parent) == "." else str(path.parent)
        try:
            name = girder_name(path.name)
            try:
                outcome, item_id = self._upload_in(completed, subdir, name, (check, folders),
                                                   known_there)
            except _StaleFolder as exc:
                logger.info("%s: %s; resolving its folders again", completed.rel_path, exc)
                self.forget_folders()
                outcome, item_id = self._upload_in(completed, subdir, name, (check, folders),
                                                   known_there)
        except GirderTerminalError as exc:
            if subdir and not folders():
                self.prune_folders(subdir)
            return FileOutcome(completed.rel_path, key, Outcome.FAILED_TERMINAL, str(exc))
        return FileOutcome(completed.rel_path, key, outcome, item_id=item_id)

    def _upload_in(self, completed: CompletedFile, subdir: str, name: str,
                   checks: tuple[Callable[[], bool], Callable[[], bool]],
                   known_there: bool) -> tuple[Outcome, str]:
        shared, folders_shared = checks
        folder = self.hold_folder(subdir, folders_shared)
        try:
            if known_there:
                existing = self._items_named(folder, name, completed.rel_path)
                if existing:
                    self._sweep_after_lookup(folder, name, existing[0], completed.rel_path)
                    return self._into_existing(existing[0], completed, shared)
            return self._upload(completed, folder, name, shared)
        finally:
            self.release_folder(subdir)

    def _upload(self, completed: CompletedFile, folder: str, name: str,
                shared: Callable[[], bool]) -> tuple[Outcome, str]:
        """Upload into ``folder`` as the item ``name`` (the name Girder stores).

        The common case, a name not in Girder yet, is ``POST item`` (with the metadata)
        and ``POST file`` (with the bytes). The item is created without
        ``reuseExisting``: with it, Girder would set our metadata on an existing item
        too, and an item skipped for different content would then name a checksum it
        does not hold. Girder renames a new item whose name is taken instead; that
        renamed, empty item (ours, made just now) is deleted and the existing one dealt
        with as before. When a folder holds the name, the file fails for good (Girder
        would store it as ``name (1)``, and every later reading again under another
        suffix), as a folder named like an existing item does."""
        item = self._create_item(folder, name, completed)
        if item_was_there(item, name):
            existing = self._items_named(folder, name, completed.rel_path)
            self._delete_empty_item(item, completed.rel_path)
            if existing:  # leftovers come only from re-deliveries of a file in Girder
                self._sweep_leftovers(folder, name, item["name"], completed)
                return self._into_existing(existing[0], completed, shared)
            if self._folders_named(folder, "folder", name):
                raise GirderTerminalError(
                    f"a folder named {name!r} is already there: Girder would store the "
                    f"file as {item['name']!r} (renamed names are not uploaded)",
                    rel_path=completed.rel_path)
            raise GirderTransientError(f"the item {name!r} vanished while the file was "
                                       f"uploaded; it is tried again", rel_path=completed.rel_path)
        oldest = self._oldest_item(folder, item["name"], item) if shared() else item
        if oldest["_id"] != item["_id"]:
            return self._into_existing(oldest, completed, shared)
        failpoints.hit("upload.mid")
        self._put_file(item["_id"], completed, shared)
        return Outcome.UPLOADED, item["_id"]

    def _create_item(self, folder: str, name: str, completed: CompletedFile) -> dict:
        """``POST item`` with the file's metadata; a folder Girder does not know raises
        :class:`_StaleFolder` (the cache is wrong: the caller resolves it again)."""
        client = self._client()
        try:
            return self._call(lambda: client.createItem(
                folder, name, metadata=self._meta(completed.sha256, created=True)), "create item",
                completed.rel_path)
        except GirderUnknownIdError as exc:
            if exc.model != "folder":
                raise
            raise _StaleFolder(str(exc), rel_path=completed.rel_path) from None

    def _items_named(self, folder: str, name: str, rel_path: str) -> list[dict]:
        client = self._client()
        return self._call(lambda: list(client.listItem(folder, name=name)), "list items",
                          rel_path)

    def _delete_empty_item(self, item: dict, rel_path: str) -> None:
        """Delete the item we just made under a name Girder changed (it holds nothing),
        or an empty leftover of ours. Gone already is fine: another member of the group,
        sweeping leftovers of the same file, may have deleted it first."""
        client = self._client()
        try:
            self._call(lambda: client.delete(f"item/{item['_id']}"), "delete renamed item",
                       rel_path)
        except GirderUnknownIdError as exc:
            if exc.model != "item":
                raise
            logger.debug("%s: %r was deleted already", rel_path, item.get("name"))

    def _oldest_item(self, folder: str, name: str, mine: dict) -> dict:
        """Of the items named ``name`` (two consumers may create one each at the same
        moment: Girder's name check is not atomic), the one every consumer keeps."""
        client = self._client()
        twins = self._call(lambda: list(client.listItem(folder, name=name)), "list items",
                           name)
        return self._keep_oldest(mine, twins, "item", name)

    def _put_file(self, item_id: str, completed: CompletedFile,
                  shared: Callable[[], bool]) -> None:
        """Upload the file into its item; when shared, make sure the item holds one file.

        Two consumers of one group can upload the same file at once. Each then lists the
        item's files and removes its own unless it is the oldest of the identical ones:
        whatever the interleaving, exactly the oldest one stays.

        The Girder file keeps the file's own name, and its mimetype is guessed from that
        name, as OpenMSIStream 1.8.8 does (Girder strips item names, not file names; an
        unknown type is Girder's ``application/octet-stream``)."""
        client = self._client()
        file_name = PurePosixPath(completed.rel_path).name
        mimetype = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        if completed.size <= SMALL_UPLOAD_BYTES:
            mine = self._upload_whole(item_id, completed, file_name, mimetype)
        else:
            mine = self._call(lambda: client.uploadFile(
                item_id, self._stream(completed), file_name, completed.size,
                parentType="item", mimeType=mimetype), "upload file", completed.rel_path)
        if not shared():
            return
        files = self._call(lambda: list(client.listFile(item_id)), "list files",
                           completed.rel_path)
        same = sorted(f["_id"] for f in files if f.get("size") == completed.size
                      and f.get("sha512", completed.file_hash.hex()) == completed.file_hash.hex())
        if mine and len(same) > 1 and same[0] != mine["_id"]:
            logger.info("%s: another consumer uploaded it at the same time; keeping its copy",
                        completed.rel_path)
            self._call(lambda: client.delete(f"file/{mine['_id']}"), "delete duplicate file",
                       completed.rel_path)

    def _upload_whole(self, item_id: str, completed: CompletedFile, file_name: str,
                      mimetype: str) -> dict:
        """One ``POST file`` whose body is the whole file: Girder starts the upload,
        takes the body as its only chunk and answers with the finished file (see
        ``initUpload`` in Girder's ``api/v1/file.py``). An answer that is still an upload
        (Girder took fewer bytes) is a transient failure: the unit's retry redoes it."""
        client = self._client()
        with self._stream(completed) as stream:
            body = stream.read()
        params = {"parentType": "item", "parentId": item_id, "name": file_name,
                  "size": completed.size, "mimeType": mimetype}
        answer = self._call(lambda: client.post(
            "file", parameters=params, data=body,
            headers={"Content-Type": "application/octet-stream"}),
            "upload file", completed.rel_path)
        if "received" in answer or answer.get("itemId") != item_id:
            raise GirderTransientError(
                f"upload file: Girder did not finish the upload in one request (it answered "
                f"{sorted(answer)[:8]})", rel_path=completed.rel_path)
        return answer

    @staticmethod
    def _stream(completed: CompletedFile):
        if completed.data is not None:
            return completed.data.open()
        return open(completed.path, "rb")  # noqa: SIM115 - girder-client reads then we drop it
