"""What Girder holds: folder trees, items, their metadata, exactly-once checks."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from girder_client import HttpError

from tests.integration.local_files import sha256

__all__ = ["VERSION_FIELD", "GirderTree", "girder_tree", "download_item", "item_path",
           "default_root_path", "folder_by_path", "assert_uploaded", "GirderListing",
           "girder_listing", "complete_in_girder", "root_folder_or_none", "assert_exactly_once"]


VERSION_FIELD = "OpenMSIStreamVersion"


@dataclass
class GirderTree:
    """What is below a Girder folder: items and sub-folders by relative POSIX path."""

    items: dict[str, dict] = field(default_factory=dict)
    folders: dict[str, dict] = field(default_factory=dict)


def girder_tree(gc, folder_id: str) -> GirderTree:
    """Walk ``folder_id`` with listFolder/listItem (by name, recursively)."""
    tree = GirderTree()

    def walk(fid: str, prefix: str) -> None:
        for item in gc.listItem(fid):
            tree.items[prefix + item["name"]] = item
        for folder in gc.listFolder(fid, parentFolderType="folder"):
            rel = prefix + folder["name"]
            tree.folders[rel] = folder
            try:
                walk(folder["_id"], rel + "/")
            except HttpError as exc:
                # Deleted since it was listed: a consumer removes the empty twin of a
                # folder another member made at the same moment (docs/architecture.md).
                if exc.status != 400 or "No such folder" not in (exc.responseText or ""):
                    raise
                del tree.folders[rel]

    walk(folder_id, "")
    return tree


def download_item(gc, item: dict) -> bytes:
    """The bytes of a one-file item (one request; several files would come as a zip)."""
    return gc.get(f"item/{item['_id']}/download", jsonResp=False).content


def item_path(gc, item: dict) -> str:
    return gc.get(f"resource/{item['_id']}/path", parameters={"type": "item"})


def default_root_path(collection_name: str, topic: str) -> str:
    """Girder path of the default root folder ``{collection_name}/{topic_name}``: every
    part is a folder below the collection, as OpenMSIStream 1.8.8 makes it."""
    return f"/collection/{collection_name}/{collection_name}/{topic}"


def folder_by_path(gc, path: str) -> dict:
    """A folder by its Girder path, e.g. ``/collection/C/topic``."""
    return gc.get("resource/lookup", parameters={"path": path})


def assert_uploaded(gc, root_folder_id: str, expected: dict[str, bytes], topic: str,
                    metadata: dict | None = None, root_path: str | None = None,
                    exact: bool = True) -> GirderTree:
    """Every expected file is an item at its mirrored path below the root folder, with
    identical bytes and the metadata of the facts file; folders made for sub-folders
    carry the metadata without a checksum. With ``exact``, nothing else is there."""
    metadata = metadata or {}
    tree = girder_tree(gc, root_folder_id)
    if exact:
        assert sorted(tree.items) == sorted(expected), (
            f"items in Girder != files produced\nonly in Girder: "
            f"{sorted(set(tree.items) - set(expected))}\nmissing: "
            f"{sorted(set(expected) - set(tree.items))}")
    else:
        missing = sorted(set(expected) - set(tree.items))
        assert not missing, f"missing in Girder: {missing}; present: {sorted(tree.items)}"
    for rel, data in expected.items():
        item = tree.items[rel]
        meta = item.get("meta") or {}
        assert meta.get("KafkaTopic") == topic, (rel, meta)
        assert meta.get("checksum") == {"sha256": sha256(data)}, (rel, meta)
        assert str(meta.get(VERSION_FIELD, "")).startswith("girder-upload-stream"), (rel, meta)
        for key, value in metadata.items():
            assert meta.get(key) == value, f"{rel}: --metadata {key!r} missing: {meta}"
        got = download_item(gc, item)
        assert got == data, f"{rel}: downloaded {len(got)} bytes differ from the {len(data)} produced"
    if root_path is not None and expected:
        # The walk above found each item by name; Girder's own path of the deepest agrees.
        deepest = max(expected, key=lambda rel: rel.count("/"))
        path = item_path(gc, tree.items[deepest])
        assert path == f"{root_path}/{deepest}", (deepest, path)
    subdirs = {"/".join(rel.split("/")[:i]) for rel in expected
               for i in range(1, rel.count("/") + 1)}
    assert subdirs <= set(tree.folders), f"folders missing: {sorted(subdirs - set(tree.folders))}"
    for rel in subdirs:
        meta = tree.folders[rel].get("meta") or {}
        assert meta.get("KafkaTopic") == topic, (rel, meta)
        assert VERSION_FIELD in meta, (rel, meta)
        assert "checksum" not in meta, (rel, meta)
        for key, value in metadata.items():
            assert meta.get(key) == value, f"folder {rel}: --metadata {key!r} missing: {meta}"
    return tree


@dataclass
class GirderListing:
    """Everything below a Girder folder, duplicates kept: (relative path, document)."""

    items: list[tuple[str, dict]] = field(default_factory=list)
    folders: list[tuple[str, dict]] = field(default_factory=list)


def girder_listing(gc, parent_id: str, parent_type: str = "folder") -> GirderListing:
    """Walk a folder (or a collection) with paging, keeping same-named siblings apart."""
    listing = GirderListing()

    def walk(pid: str, ptype: str, prefix: str) -> None:
        if ptype == "folder":
            for item in gc.listItem(pid):
                listing.items.append((prefix + item["name"], item))
        for folder in gc.listFolder(pid, parentFolderType=ptype):
            rel = prefix + folder["name"]
            listing.folders.append((rel, folder))
            walk(folder["_id"], "folder", rel + "/")

    walk(parent_id, parent_type, "")
    return listing


def complete_in_girder(gc, root_folder_id: str, files: dict[str, bytes]) -> set[str]:
    """The expected files that are items of their full size below the root (an item
    created but not given its file yet has size 0)."""
    tree = girder_tree(gc, root_folder_id)
    return {rel for rel, item in tree.items.items()
            if rel in files and item.get("size") == len(files[rel])}


def root_folder_or_none(gc, root_path: str) -> dict | None:
    try:
        return folder_by_path(gc, root_path)
    except Exception:  # noqa: BLE001 - Girder answers 400 until the folder exists
        return None


def assert_exactly_once(gc, root_folder_id: str, files: dict[str, bytes], topic: str,
                        root_path: str | None = None) -> GirderTree:
    """Every file is in Girder exactly once: one item per file at its path (none else),
    right bytes and sha256, exactly one Girder file per item, no two items or folders of
    the same name in one folder, and no folder that no file needs."""
    listing = girder_listing(gc, root_folder_id)
    for kind, entries in (("item", listing.items), ("folder", listing.folders)):
        counts = collections.Counter(rel for rel, _ in entries)
        doubled = sorted(rel for rel, n in counts.items() if n > 1)
        assert not doubled, f"{kind}s that appear more than once in their folder: {doubled}"
    several = {}
    for rel, item in listing.items:
        item_files = list(gc.listFile(item["_id"]))
        if len(item_files) != 1:
            several[rel] = [(f["name"], f.get("size")) for f in item_files]
    assert not several, f"items without exactly one file: {several}"
    tree = assert_uploaded(gc, root_folder_id, files, topic, root_path=root_path, exact=True)
    subdirs = {"/".join(rel.split("/")[:i]) for rel in files
               for i in range(1, rel.count("/") + 1)}
    assert set(tree.folders) == subdirs, (
        f"unexpected folders below the root: {sorted(set(tree.folders) - subdirs)}")
    return tree
