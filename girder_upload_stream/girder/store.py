"""Every girder-client call of the project lives here.

A :class:`GirderStore` logs in and resolves the root folder once (:meth:`GirderStore.check`,
before anything is consumed), mirrors sub-folders below it (created once and cached,
not looked up per file), and uploads one item per file with its metadata. Re-delivered
files are harmless: an item of the same name whose checksum matches is skipped, which
is what makes uploads effectively-once. Names are those Girder stores (stripped of
leading and trailing white space), so that a lookup finds what a create made.

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
from girder_upload_stream.girder.errors import (LOGIN, GirderAuthError, GirderStartupError,
                                                GirderTerminalError, GirderTransientError,
                                                girder_name, translate)
from girder_upload_stream.assembly.reassembly import CompletedFile
from girder_upload_stream.settings import GirderSettings
from girder_upload_stream.ledger.units import FileOutcome, Outcome

__all__ = ["VERSION_FIELD", "VERSION_VALUE", "GirderTransientError", "GirderTerminalError",
           "GirderAuthError", "GirderStartupError", "GirderStore", "girder_name"]

logger = logging.getLogger(__name__)

#: OpenMSIStream's key, kept so downstream queries on it keep working; the value names
#: this program and its version instead of an OpenMSIStream release.
VERSION_FIELD = "OpenMSIStreamVersion"
VERSION_VALUE = f"girder-upload-stream {__version__}"
T = TypeVar("T")
#: Bytes girder-client reads per upload request of a whole file (its default, 64 MiB,
#: held one block per upload worker, is RAM the memory budget does not see).
UPLOAD_BLOCK_BYTES = 16 << 20


class GirderStore:
    """Uploads completed files below one root folder; thread-safe (one client per thread)."""

    def __init__(self, settings: GirderSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._local = threading.local()
        self._folders: dict[str, str] = {}
        self._folder_lock = threading.Lock()
        self.requests = 0

    # -- plumbing ------------------------------------------------------------------
    def _client(self):
        """This thread's client, logged in (a new log-in after an authentication error)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from girder_client import GirderClient
            client = GirderClient(apiUrl=self.settings.api_url)
            client.MAX_CHUNK_SIZE = UPLOAD_BLOCK_BYTES
            self._call(lambda: self._login(client), LOGIN)
            self._local.client = client
        return client

    def _login(self, client: Any) -> None:
        # girder-client's authenticate() puts the key in the URL's query string, which
        # connection errors, proxies and access logs quote; a form body they do not.
        answer = client.sendRestRequest(
            "POST", "api_key/token", data={"key": self.settings.api_key.get_secret_value()})
        client.setToken(answer["authToken"]["token"])

    def _call(self, fn: Callable[[], T], what: str, rel_path: str | None = None) -> T:
        self.requests += 1
        try:
            return fn()
        except Exception as exc:
            failure = translate(exc, what, rel_path, (self.settings.api_key.get_secret_value(),))
            if failure is None:
                raise
        if isinstance(failure, GirderAuthError):
            self._local.client = None  # log in again at this thread's next request
        # Raised outside the except block: the library's exception, whose text may quote
        # a URL with credentials, is neither chained nor shown in a traceback.
        raise failure

    def _meta(self, sha256: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {**self.settings.metadata, VERSION_FIELD: VERSION_VALUE,
                                "KafkaTopic": self.topic}
        if sha256 is not None:
            meta["checksum"] = {"sha256": sha256}
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

    def root_folder_id(self) -> str:
        """The root folder's id: given, or found/created from collection and path."""
        with self._folder_lock:
            if "" not in self._folders:
                self._folders[""] = self._resolve_root()
            return self._folders[""]

    def _resolve_root(self) -> str:
        """As OpenMSIStream 1.8.8 does: the collection is found by name or created public;
        then every part of the root path is a folder below it, the first part included.
        Every folder gets the minimal metadata, except a first part named like the
        collection (``{collection_name}/{topic}``, the default), which gets none."""
        client = self._client()
        if self.settings.root_folder_id:
            return self._call(lambda: client.getFolder(self.settings.root_folder_id),
                              "root folder")["_id"]
        collection = self._collection(girder_name(self.settings.collection_name, "collection"))
        path = self.settings.root_path_for(self.topic)
        parent, parent_type = collection["_id"], "collection"
        for depth, part in enumerate(path.split("/")):
            metadata = None if depth == 0 and part == self.settings.collection_name \
                else self._meta()
            name = girder_name(part, f"folder (in the root folder path {path!r})")
            parent = self._make_folder(parent, name, parent_type, metadata)
            parent_type = "folder"
        return parent

    def _collection(self, name: str) -> dict:
        """The collection ``name``, created public if missing (OpenMSIStream does)."""
        client = self._client()
        collection = self._find_collection(name)
        if collection is None:
            try:
                collection = self._call(lambda: client.createCollection(name, public=True),
                                        "create collection")
            except GirderTerminalError as exc:
                # Another consumer of the group created it since we looked.
                collection = self._find_collection(name)
                if "already exists" not in str(exc) or collection is None:
                    raise
        return collection

    def _find_collection(self, name: str) -> dict | None:
        # A path lookup, not a text search: the dev stack's mongo-java-server has no
        # $text. Girder answers 400 for a path that does not exist.
        client = self._client()
        try:
            return self._call(lambda: client.resourceLookup(f"/collection/{name}"),
                              "find collection")
        except GirderTerminalError as exc:
            if "HTTP 400" in str(exc):
                return None
            raise

    def _make_folder(self, parent: str, name: str, parent_type: str,
                     metadata: dict[str, Any] | None) -> str:
        """Find or create a folder (``name`` as Girder stores it) and set ``metadata`` on
        it (None: leave it); of twins made at the same moment by two consumers (Girder's
        reuseExisting is not atomic), every consumer keeps the oldest."""
        client = self._client()

        def create() -> dict:
            return self._call(lambda: client.createFolder(
                parent, name, parentType=parent_type, reuseExisting=True,
                metadata=metadata), f"create folder {name!r}")
        try:
            mine = create()
        except GirderTerminalError as exc:
            if "already exists" not in str(exc):  # created by another between two checks
                raise
            mine = create()
        twins = self._call(lambda: list(client.listFolder(parent, parentFolderType=parent_type,
                                                          name=name)), "list folders", name)
        return self._keep_oldest(mine, twins, "folder", name)["_id"]

    def _keep_oldest(self, mine: dict, twins: list[dict], kind: str, name: str) -> dict:
        """The oldest of same-named twins (Girder ids grow with time, so every consumer
        picks the same one); ours is deleted if it is not that one."""
        oldest = min([*twins, mine], key=lambda t: t["_id"])
        if oldest["_id"] != mine["_id"]:
            logger.info("%s %r: another consumer created it at the same time; using its "
                        "%s", kind, name, kind)
            client = self._client()
            self._call(lambda: client.delete(f"{kind}/{mine['_id']}"),
                       f"delete duplicate {kind}", name)
        return oldest

    def folder_for(self, subdir: str) -> str:
        """Id of the folder mirroring ``subdir`` below the root, created once, then cached
        (by the names Girder stores: ``' sub '`` and ``'sub'`` are one folder)."""
        root = self.root_folder_id()
        if not subdir:
            return root
        names = [girder_name(part, "folder") for part in PurePosixPath(subdir).parts]
        with self._folder_lock:
            parent = root
            for depth in range(1, len(names) + 1):
                key = "/".join(names[:depth])
                if key not in self._folders:
                    self._folders[key] = self._make_folder(parent, names[depth - 1],
                                                           "folder", self._meta())
                parent = self._folders[key]
            return parent

    # -- items ---------------------------------------------------------------------
    def holds(self, rel_path: str, file_hash: bytes) -> bool | None:
        """Whether Girder already has this generation of ``rel_path`` (same name, one
        file whose sha512 is ``file_hash``): the restart check of a re-read file.

        None when it cannot tell now (Girder unreachable); False also when the stored
        file has no sha512 (an assetstore that does not hash) -- it is then rebuilt."""
        path = PurePosixPath(rel_path)
        subdir = "" if str(path.parent) == "." else str(path.parent)
        try:
            client = self._client()
            name = girder_name(path.name)
            folder = self.folder_for(subdir)
            items = self._call(lambda: list(client.listItem(folder, name=name)),
                               "list items", rel_path)
            for item in items:
                files = self._call(lambda: list(client.listFile(item["_id"])), "list files",
                                   rel_path)
                if len(files) == 1 and files[0].get("sha512") == file_hash.hex():
                    return True
        except GirderTransientError as exc:
            logger.warning("cannot look up %s in Girder now: %s", rel_path, exc)
            return None
        except GirderTerminalError as exc:
            logger.warning("cannot look up %s in Girder: %s", rel_path, exc)
        return False

    def upload(self, completed: CompletedFile,
               shared: bool | Callable[[], bool] = False) -> FileOutcome:
        """Put one file in Girder, or say why not. Never raises for terminal problems.

        ``shared``: another consumer of the group may be uploading the same file now
        (the group has other members, or partitions moved lately): the item and its
        file are then checked for twins after they are made, which costs two requests.
        A callable is asked at each check, so partitions revoked during the upload
        still count."""
        check = shared if callable(shared) else (lambda: bool(shared))
        key = completed.file_key
        path = PurePosixPath(completed.rel_path)
        subdir = "" if str(path.parent) == "." else str(path.parent)
        try:
            name = girder_name(path.name)
            outcome, item_id = self._upload(completed, self.folder_for(subdir), name, check)
        except GirderTerminalError as exc:
            return FileOutcome(completed.rel_path, key, Outcome.FAILED_TERMINAL, str(exc))
        return FileOutcome(completed.rel_path, key, outcome, item_id=item_id)

    def _upload(self, completed: CompletedFile, folder: str, name: str,
                shared: Callable[[], bool]) -> tuple[Outcome, str]:
        """Upload into ``folder`` as the item ``name`` (the name Girder stores)."""
        client = self._client()
        rel = completed.rel_path
        items = self._call(lambda: list(client.listItem(folder, name=name)), "list items", rel)
        if not items:
            item = self._call(lambda: client.createItem(
                folder, name, metadata=self._meta(completed.sha256), reuseExisting=True),
                "create item", rel)
            oldest = self._oldest_item(folder, name, item) if shared() else item
            if oldest["_id"] == item["_id"]:
                failpoints.hit("upload.mid")
                self._put_file(item["_id"], completed, shared)
                return Outcome.UPLOADED, item["_id"]
            items = [oldest]
        item = items[0]
        files = self._call(lambda: list(client.listFile(item["_id"])), "list files", rel)
        if self._same_content(item, files, completed):
            self._repair_checksum(item, completed)
            return Outcome.SKIPPED_IDENTICAL, item["_id"]
        if not files:  # an item left without its file (a crash, or another consumer now)
            self._put_file(item["_id"], completed, shared)
            self._call(lambda: client.addMetadataToItem(item["_id"], self._meta(completed.sha256)),
                       "set metadata", rel)
            return Outcome.UPLOADED, item["_id"]
        if not self.settings.replace_existing:
            logger.warning("%s: an item with different content is already in Girder; skipped "
                           "(use --replace_existing to replace it)", rel)
            return Outcome.SKIPPED_DIFFERENT, item["_id"]
        self._call(lambda: client.uploadFileContents(files[0]["_id"], self._stream(completed),
                                                     completed.size), "replace contents", rel)
        self._call(lambda: client.addMetadataToItem(item["_id"], self._meta(completed.sha256)),
                   "set metadata", rel)
        return Outcome.REPLACED, item["_id"]

    @staticmethod
    def _same_content(item: dict, files: list[dict], completed: CompletedFile) -> bool:
        if len(files) != 1 or files[0].get("size") != completed.size:
            return False
        sha512 = files[0].get("sha512")
        if sha512:
            return sha512 == completed.file_hash.hex()
        return (item.get("meta") or {}).get("checksum", {}).get("sha256") == completed.sha256

    def _repair_checksum(self, item: dict, completed: CompletedFile) -> None:
        """An item whose file already holds these bytes but whose checksum names other
        ones: a replace whose metadata request failed (the file then failed, and this is
        the retry). Its metadata is set now, so that the item describes its contents."""
        checksum = (item.get("meta") or {}).get("checksum")
        if not isinstance(checksum, dict) or checksum.get("sha256") in (None, completed.sha256):
            return  # no checksum of ours to correct (e.g. an item someone else made)
        client = self._client()
        self._call(lambda: client.addMetadataToItem(item["_id"], self._meta(completed.sha256)),
                   "set metadata", completed.rel_path)

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
        mine = self._call(lambda: client.uploadFile(item_id, self._stream(completed), file_name,
                                                    completed.size, parentType="item",
                                                    mimeType=mimetype),
                          "upload file", completed.rel_path)
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

    @staticmethod
    def _stream(completed: CompletedFile):
        if completed.data is not None:
            return completed.data.open()
        return open(completed.path, "rb")  # noqa: SIM115 - girder-client reads then we drop it
