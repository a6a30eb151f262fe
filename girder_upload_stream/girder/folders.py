"""The folder side of :class:`~girder_upload_stream.girder.store.GirderStore`: the root
folder (found or created as OpenMSIStream 1.8.8 does) and the sub-folders mirroring the
producer's tree, each created with its metadata in one request and cached by the names
Girder stores. The cache is trusted until Girder says it is wrong (an item created in a
folder deleted since): the store then forgets it and resolves the chain again.

A mixin, not a module of its own client: it sends every request through the store's
``_client``/``_call`` plumbing and uses its ``_meta``, ``settings``, ``topic``,
``_folders`` and ``_folder_lock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from girder_upload_stream.girder.errors import GirderTerminalError, girder_name

__all__ = ["FolderMixin"]

logger = logging.getLogger(__name__)


class FolderMixin:
    """Root and sub-folder resolution for :class:`GirderStore` (see the module text)."""

    # Provided by GirderStore.
    settings: Any
    topic: str
    _folders: dict[str, str]
    _folder_lock: Any
    _client: Callable[[], Any]
    _call: Callable[..., Any]
    _meta: Callable[..., dict[str, Any]]

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
                     metadata: dict[str, Any] | None, shared: bool = True) -> str:
        """Find or create a folder (``name`` as Girder stores it) and set ``metadata`` on
        it (None: leave it), in one request; when ``shared``, of twins made at the same
        moment by two consumers (Girder's reuseExisting is not atomic), every consumer
        keeps the oldest (one more request, and one per twin)."""
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
        if not shared:
            return mine["_id"]
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

    def folder_for(self, subdir: str, shared: bool | Callable[[], bool] = True) -> str:
        """Id of the folder mirroring ``subdir`` below the root, created once, then cached
        (by the names Girder stores: ``' sub '`` and ``'sub'`` are one folder).

        ``shared`` (as in :meth:`upload`; by default True): whether another consumer may
        create the same folder now, which costs a twin check per folder created."""
        check = shared if callable(shared) else (lambda: bool(shared))
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
                                                           "folder", self._meta(), check())
                parent = self._folders[key]
            return parent

    def _forget_folders(self) -> None:
        """Drop the cached sub-folders (not the root, resolved at start): Girder said one
        of them is gone, and any of its ancestors may be too."""
        with self._folder_lock:
            root = self._folders.get("")
            self._folders.clear()
            if root is not None:
                self._folders[""] = root
