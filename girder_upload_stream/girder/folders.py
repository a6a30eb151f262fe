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
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.girder.errors import (GirderNameTakenError, GirderRootFolderGone,
                                                GirderTerminalError, GirderTransientError,
                                                girder_name)

__all__ = ["FolderMixin"]

logger = logging.getLogger(__name__)


class FolderMixin:
    """Root and sub-folder resolution for :class:`GirderStore` (see the module text)."""

    # Provided by GirderStore.
    settings: Any
    topic: str
    _folders: dict[str, str]
    _folder_lock: Any
    _busy: dict[str, int]
    _owner: Callable[[], Any]
    #: Seconds between two look-ups of a root folder given by path (see root_folder_id).
    root_recheck_seconds: float = 60.0
    _root_checked: float = 0.0
    _client: Callable[[], Any]
    _call: Callable[..., Any]
    _meta: Callable[..., dict[str, Any]]

    def root_folder_id(self) -> str:
        """The root folder's id: given, or found/created from collection and path. Given
        by path, it is looked up again every :attr:`root_recheck_seconds` (one request):
        a root folder moved away is replaced by a new one at the path."""
        with self._folder_lock:
            if "" not in self._folders:
                self._folders[""] = self._resolve_root()
                self._root_checked = time.monotonic()
            elif not self.settings.root_folder_id and \
                    time.monotonic() - self._root_checked >= self.root_recheck_seconds:
                self._recheck_root()
            return self._folders[""]

    def _resolve_root(self) -> str:
        """As OpenMSIStream 1.8.8 does: the collection is found by name or created public;
        then every part of the root path is a folder below it, the first part included.
        Every folder it creates gets the minimal metadata, except a first part named
        like the collection (``{collection_name}/{topic}``, the default), which gets
        none. A root folder given by id that Girder no longer has (or no longer lets
        this key see) is :class:`GirderRootFolderGone`: nothing can be uploaded."""
        client = self._client()
        if self.settings.root_folder_id:
            try:
                return self._call(lambda: client.getFolder(self.settings.root_folder_id),
                                  "root folder")["_id"]
            except GirderTerminalError as exc:
                raise GirderRootFolderGone(
                    f"the root folder {self.settings.root_folder_id} (given by id) is gone "
                    f"from Girder or no longer readable ({exc}); give an existing folder "
                    f"with --girder_root_folder_id") from None
        collection = self._collection(girder_name(self.settings.collection_name, "collection"))
        path = self.settings.root_path_for(self.topic)
        parent, parent_type = collection["_id"], "collection"
        for depth, part in enumerate(path.split("/")):
            metadata = None if depth == 0 and part == self.settings.collection_name \
                else self._meta(created=True)
            name = girder_name(part, f"folder (in the root folder path {path!r})")
            parent = self._make_folder(parent, name, parent_type, metadata)
            parent_type = "folder"
        return parent

    def _recheck_root(self) -> None:
        """The root folder given by path: still the folder at that path? If not (deleted,
        moved or renamed in Girder), the path is resolved again (made if missing) and
        the sub-folders are forgotten. Called with the folder lock held."""
        client = self._client()
        names = [girder_name(self.settings.collection_name, "collection"),
                 *(girder_name(part, "folder")
                   for part in self.settings.root_path_for(self.topic).split("/"))]
        try:
            found = self._call(lambda: client.resourceLookup("/collection/" + "/".join(names)),
                               "look up the root folder")["_id"]
        except GirderTerminalError:
            found = None  # HTTP 400: nothing at that path any more
        self._root_checked = time.monotonic()
        if found == self._folders[""]:
            return
        logger.warning("the root folder %s is no longer at /collection/%s in Girder; "
                       "using the folder there (made if missing)", self._folders[""],
                       "/".join(names))
        self._folders.clear()
        self._folders[""] = found or self._resolve_root()

    def _collection(self, name: str) -> dict:
        """The collection ``name``, created public if missing (OpenMSIStream does).

        Consumers started together may each create it: Girder's name check is not
        atomic, and two collections of one name would split the group's files between
        them for good. One that creates it therefore lists the collections of that name
        and uses the oldest (every creator picks the same); its own twin, made just now,
        is deleted while it holds nothing. Found, it costs one lookup as before."""
        client = self._client()
        collection = self._find_collection(name)
        if collection is not None:
            return collection
        try:
            mine = self._call(lambda: client.createCollection(name, public=True),
                              "create collection")
        except GirderNameTakenError:
            mine = None  # another consumer of the group created it since we looked
        named = [c for c in self._call(lambda: list(client.listCollection()),
                                       "list collections") if c.get("name") == name]
        if not named:
            if mine is None:
                raise GirderTransientError(f"the collection {name!r} vanished while it was "
                                           f"looked up; it is tried again")
            return mine
        oldest = min(named, key=lambda c: c["_id"])
        if mine is not None and mine["_id"] != oldest["_id"]:
            self._drop_twin_collection(mine, name)
        return oldest

    def _drop_twin_collection(self, mine: dict, name: str) -> None:
        """Delete the twin collection this consumer made, unless something is in it
        already (another consumer's lookup found it first: it is then left, and said)."""
        client = self._client()
        inside = self._call(lambda: list(client.listFolder(
            mine["_id"], parentFolderType="collection", limit=1)), "list folders", name)
        if inside:
            logger.warning("collection %r: another consumer created it at the same time, "
                           "and folders are in ours (%s) already; it is left as it is, the "
                           "oldest is used", name, mine["_id"])
            return
        logger.info("collection %r: another consumer created it at the same time; using "
                    "the oldest", name)
        self._call(lambda: client.delete(f"collection/{mine['_id']}"),
                   "delete duplicate collection", name)

    def _find_collection(self, name: str) -> dict | None:
        # A path lookup, not a text search: the dev stack's mongo-java-server has no
        # $text. Girder answers 400 for a path that does not exist.
        client = self._client()
        try:
            return self._call(lambda: client.resourceLookup(f"/collection/{name}"),
                              "find collection")
        except GirderTerminalError as exc:
            if exc.status == 400:
                return None
            raise

    def _make_folder(self, parent: str, name: str, parent_type: str,
                     metadata: dict[str, Any] | None,
                     shared: bool | Callable[[], bool] = True) -> str:
        """Find or create a folder (``name`` as Girder stores it). A new one is created
        with ``metadata`` (None: none) in one request; one that is there already is
        used as it is, its metadata never rewritten (it may be a person's). When
        ``shared``, of twins made at the same moment by two consumers (Girder's name
        check is not atomic), every consumer keeps the oldest (one more request, and
        one per twin); a folder found, not made, is never deleted. A callable is asked
        once the folder is made, not before: partitions revoked while the request was
        on its way (their next owner may be making the same folder now) still count."""
        client = self._client()
        for _ in range(2):
            try:
                mine = self._call(lambda: client.createFolder(
                    parent, name, parentType=parent_type, metadata=metadata),
                    f"create folder {name!r}")
            except GirderNameTakenError as exc:
                if exc.taken_by != "folder":
                    raise  # an item of that name: terminal
                found = self._folders_named(parent, parent_type, name)
                if found:
                    return min(found, key=lambda f: f["_id"])["_id"]
                continue  # deleted between the two requests: create it again
            if not (shared() if callable(shared) else shared):
                return mine["_id"]
            return self._keep_oldest(mine, self._folders_named(parent, parent_type, name),
                                     "folder", name)["_id"]
        raise GirderTerminalError(f"create folder {name!r}: it exists and vanishes again")

    def _folders_named(self, parent: str, parent_type: str, name: str) -> list[dict]:
        client = self._client()
        return self._call(lambda: list(client.listFolder(parent, parentFolderType=parent_type,
                                                         name=name)), "list folders", name)

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

    def folder_for(self, subdir: str, shared: bool | Callable[[], bool] = True,
                   hold: bool = False) -> str:
        """Id of the folder mirroring ``subdir`` below the root, created once, then cached
        (by the names Girder stores: ``' sub '`` and ``'sub'`` are one folder).

        ``shared`` (as in :meth:`upload`; by default True): whether another consumer may
        create the same folder now, which costs a twin check per folder created.
        ``hold``: the folder and its parents count as in use until
        :meth:`release_folder` (:meth:`prune_folders` leaves them alone meanwhile)."""
        check = shared if callable(shared) else (lambda: bool(shared))
        root = self.root_folder_id()  # takes the folder lock itself
        names = [girder_name(part, "folder") for part in PurePosixPath(subdir).parts]
        with self._folder_lock:
            parent = self._walk(root, names, lambda parent, name: self._make_folder(
                parent, name, "folder", self._meta(created=True), check))
            for depth in range(1, len(names) + 1) if hold else ():
                key = "/".join(names[:depth])
                self._busy[key] = self._busy.get(key, 0) + 1
            return parent

    def existing_folder(self, subdir: str) -> str | None:
        """Id of the folder mirroring ``subdir`` if Girder has it (None: a part is
        missing), never made: a look-up must leave nothing behind. Found ones are
        cached, as made ones are."""
        def find(parent: str, name: str) -> str | None:
            found = self._folders_named(parent, "folder", name)
            return min(found, key=lambda f: f["_id"])["_id"] if found else None
        root = self.root_folder_id()  # takes the folder lock itself
        names = [girder_name(part, "folder") for part in PurePosixPath(subdir).parts]
        with self._folder_lock:
            return self._walk(root, names, find)

    def _walk(self, parent: str, names: list[str],
              step: Callable[[str, str], str | None]) -> str | None:
        """Down from the root folder ``parent`` by ``names`` (under the folder lock): each
        folder's id from the cache, else from ``step(parent_id, name)`` (cached); None
        where it gives none."""
        for depth in range(1, len(names) + 1):
            key = "/".join(names[:depth])
            if key not in self._folders:
                found = step(parent, names[depth - 1])
                if found is None:
                    return None
                self._folders[key] = found
            parent = self._folders[key]
        return parent

    def hold_folder(self, subdir: str, shared: bool | Callable[[], bool] = True) -> str:
        """:meth:`folder_for` with ``hold``: the folder stays until released."""
        return self.folder_for(subdir, shared, hold=True)

    def release_folder(self, subdir: str) -> None:
        """The end of a :meth:`hold_folder`."""
        names = [part.strip() for part in PurePosixPath(subdir).parts]
        with self._folder_lock:
            for depth in range(1, len(names) + 1):
                key = "/".join(names[:depth])
                left = self._busy.get(key, 0) - 1
                if left > 0:
                    self._busy[key] = left
                else:
                    self._busy.pop(key, None)

    def prune_folders(self, subdir: str) -> None:
        """Delete the sub-folders made for ``subdir`` that are left empty (a file that
        failed for good, a streamed upload given up), deepest first, never the root.
        Only folders of the consumer's (see ownership.py), cached by this run and not
        in use by another upload of this process are deleted; the first other one ends
        it. The caller makes sure no other consumer may upload into them now (a folder
        deleted under another upload would take its item with it)."""
        try:
            names = [girder_name(part, "folder") for part in PurePosixPath(subdir).parts]
            owner, client = self._owner(), self._client()
        except GirderUploadStreamError:
            return
        with self._folder_lock:
            for depth in range(len(names), 0, -1):
                key = "/".join(names[:depth])
                folder_id = self._folders.get(key)
                if folder_id is None or self._busy.get(key):
                    return
                try:
                    folder = self._call(lambda: client.getFolder(folder_id), "get folder", key)
                    if not owner.owns(folder) or self._has_children(folder_id, key):
                        return
                    self._call(lambda: client.delete(f"folder/{folder_id}"),
                               "delete empty folder", key)
                except GirderUploadStreamError as exc:
                    logger.info("folder %r left in Girder: %s", key, exc)
                    return
                logger.info("folder %r: made for files that did not land; deleted", key)
                for cached in [k for k in self._folders if k == key or k.startswith(key + "/")]:
                    del self._folders[cached]

    def _has_children(self, folder_id: str, key: str) -> bool:
        client = self._client()
        items = self._call(lambda: list(client.listItem(folder_id, limit=1)), "list items", key)
        return bool(items) or bool(self._call(lambda: list(client.listFolder(
            folder_id, limit=1)), "list folders", key))

    def forget_folders(self) -> None:
        """Drop every cached folder, the root's too: Girder said one of them is gone, and
        any of its ancestors may be too (the root is looked up again: given by id, it
        must still be there; given by path, it is made again if missing)."""
        with self._folder_lock:
            self._folders.clear()
