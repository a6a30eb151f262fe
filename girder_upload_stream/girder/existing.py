"""The existing-item side of :class:`~girder_upload_stream.girder.store.GirderStore`:
what an upload does when an item of the file's name is there already (skip identical
content, fill an item of the consumer's left without its file, skip or replace other
content) and the sweep of empty items an interrupted upload left. Nothing here
deletes, empties or fills an item the consumer did not create (see
:mod:`~girder_upload_stream.girder.ownership`), except the documented
``--replace_existing``.

A mixin, as :class:`~girder_upload_stream.girder.folders.FolderMixin`: every request
goes through the store's ``_client``/``_call`` plumbing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from girder_upload_stream.shared_types import CompletedFile, Outcome
from girder_upload_stream.girder.ownership import TAG_FIELD

__all__ = ["ExistingItemMixin"]

logger = logging.getLogger(__name__)

#: How many ``name (k)`` suffixes a sweep of leftovers looks at, at most.
SWEEP_NAMES = 4


class ExistingItemMixin:
    """Items of the file's name found in Girder (see the module text)."""

    # Provided by GirderStore.
    settings: Any
    _client: Callable[[], Any]
    _call: Callable[..., Any]
    _meta: Callable[..., dict[str, Any]]
    _owner: Callable[[], Any]
    _items_named: Callable[..., list[dict]]
    _delete_empty_item: Callable[..., None]
    _put_file: Callable[..., None]
    _stream: Callable[..., Any]

    def _sweep_leftovers(self, folder: str, name: str, renamed: str,
                         completed: CompletedFile) -> None:
        """Girder named ours ``name (k)`` (and it is deleted already): other suffixes
        may hold items a process killed between its ``POST item`` and the ``DELETE`` of
        that renamed item left behind. Those (the consumer's, empty, and claiming this
        very file's checksum) are deleted, so that the name holds one item again; any
        other item of those names is left alone. Girder takes the *first free* suffix,
        so leftovers may sit above ours too once a lower one was swept: ``(1)`` ..
        ``(k-1)`` are all looked at, and the names above ours while they are taken (at
        most five names; a re-delivery renamed ``name (1)`` looks at ``name (2)``)."""
        match = re.fullmatch(re.escape(name) + r" \((\d+)\)", renamed)
        if completed.size == 0 or not match:
            return
        ours = int(match.group(1))
        below = range(1, min(ours, SWEEP_NAMES + 1))
        above = range(ours + 1, ours + 1 + max(1, SWEEP_NAMES - len(below)))
        self._sweep_names(folder, name, completed.sha256, completed.rel_path, below)
        self._sweep_names(folder, name, completed.sha256, completed.rel_path, above,
                          stop_early=True)

    def _sweep_after_lookup(self, folder: str, name: str, item: dict, rel_path: str) -> None:
        """The restart check found the file in Girder (``item``): a run killed while it
        uploaded the file again may have left ``name (1)`` (then ``(2)``..) behind, and
        no upload of it comes to sweep it, so the check does, from ``(1)`` on while such
        names are taken (at most four). One request when there is none."""
        checksum = ((item.get("meta") or {}).get("checksum") or {}).get("sha256")
        if checksum and item.get("size"):
            self._sweep_names(folder, name, checksum, rel_path, range(1, SWEEP_NAMES + 1),
                              stop_early=True)

    def _sweep_names(self, folder: str, name: str, sha256: str | None, rel_path: str,
                     suffixes: range, stop_early: bool = False) -> None:
        owner = self._owner()
        for k in suffixes:
            others = self._items_named(folder, f"{name} ({k})", rel_path)
            if stop_early and not others:
                return  # Girder takes the first free suffix: none beyond a free one
            for other in others:
                checksum = (other.get("meta") or {}).get("checksum") or {}
                if other.get("size") == 0 and sha256 and checksum.get("sha256") == sha256 \
                        and owner.owns(other):
                    logger.info("%s: deleting %r, an empty item left by an interrupted "
                                "upload of it", rel_path, other["name"])
                    self._delete_empty_item(other, rel_path)

    def _into_existing(self, item: dict, completed: CompletedFile,
                       shared: Callable[[], bool]) -> tuple[Outcome, str]:
        """An item of the file's name was there: skip identical content, fill an item
        of the consumer's left without its file, replace (``--replace_existing``) or
        skip different content. An empty item someone else made is other content: it
        is filled only with ``--replace_existing``."""
        client = self._client()
        rel = completed.rel_path
        files = self._call(lambda: list(client.listFile(item["_id"])), "list files", rel)
        if self._same_content(item, files, completed):
            self._repair_checksum(item, completed)
            return Outcome.SKIPPED_IDENTICAL, item["_id"]
        ours = self._owner().owns(item)
        if not files and (ours or self.settings.replace_existing):
            # Ours, left without its file (a crash, a stream given up, another consumer
            # now), or someone's empty item the operator lets us replace.
            self._put_file(item["_id"], completed, shared)
            meta = {**self._meta(completed.sha256), TAG_FIELD: None}  # null: key removed
            self._call(lambda: client.addMetadataToItem(item["_id"], meta), "set metadata", rel)
            return (Outcome.UPLOADED if ours else Outcome.REPLACED), item["_id"]
        if not self.settings.replace_existing:
            logger.warning("%s: an item with %s is already in Girder; skipped "
                           "(use --replace_existing to replace it)", rel,
                           "different content" if files else "no file, made by someone else")
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
        the retry). Its metadata is set now, so that the item describes its contents:
        the consumer's items, and with ``--replace_existing`` (which replaces the
        metadata of items of the file's name) any other."""
        checksum = (item.get("meta") or {}).get("checksum")
        if not isinstance(checksum, dict) or checksum.get("sha256") in (None, completed.sha256):
            return  # no checksum to correct
        if not (self.settings.replace_existing or self._owner().owns(item)):
            return  # someone else's item, which only --replace_existing may change
        client = self._client()
        self._call(lambda: client.addMetadataToItem(item["_id"], self._meta(completed.sha256)),
                   "set metadata", completed.rel_path)
