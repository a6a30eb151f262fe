"""Consumers started together on a fresh collection (issue 23's scale-out, scenario 10):
each may create it, as Girder's name check is not atomic. Two collections of one name
split a group's files between them for good (a whole member's share missing from the
one people look at), so a creator lists the collections of that name and uses the
oldest, deleting its own twin while nothing is in it."""

from __future__ import annotations

import json

from girder_client import HttpError

from girder_upload_stream.girder.ownership import Owner
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.settings import GirderSettings


class _Girder:
    """Collections only; ``twin_first``: another consumer's twin is made while ours is
    (an older id), ``twin_used``: and that consumer's lookup found ours first."""

    def __init__(self, twin_first: bool = False, ours_used: bool = False) -> None:
        self.collections: list[dict] = []
        self.folders: list[dict] = []
        self.calls: list[str] = []
        self.twin_first, self.ours_used = twin_first, ours_used

    def resourceLookup(self, path):
        self.calls.append("resourceLookup")
        raise HttpError(status=400, url="http://girder/api/v1/resource/lookup", method="GET",
                        text=json.dumps({"message": f"Path not found: {path}", "type": "rest"}))

    def createCollection(self, name, public=False):
        self.calls.append("createCollection")
        if self.twin_first:
            self.collections.append({"_id": "c1", "name": name})
        mine = {"_id": "c2", "name": name}
        self.collections.append(mine)
        if self.ours_used:
            self.folders.append({"_id": "f1", "parent": "c2"})
        return dict(mine)

    def listCollection(self):
        self.calls.append("listCollection")
        return [dict(c) for c in self.collections]

    def listFolder(self, parent, parentFolderType="folder", name=None, limit=None):
        self.calls.append("listFolder")
        return [dict(f) for f in self.folders if f["parent"] == parent][:limit]

    def delete(self, path):
        self.calls.append(f"delete {path}")
        self.collections = [c for c in self.collections if f"collection/{c['_id']}" != path]


def _store(girder: _Girder) -> GirderStore:
    settings = GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key="k" * 40,
                              collection_name="lab")
    store = GirderStore(settings, "topic")
    store._local.client = girder
    store.owner = Owner("u" * 24)
    return store


def test_a_collection_made_alone_is_used_and_checked_once():
    girder = _Girder()
    assert _store(girder)._collection("lab")["_id"] == "c2"
    assert girder.calls == ["resourceLookup", "createCollection", "listCollection"]


def test_a_twin_made_at_the_same_moment_wins_if_older_and_ours_is_deleted():
    girder = _Girder(twin_first=True)
    assert _store(girder)._collection("lab")["_id"] == "c1"
    assert girder.calls[-2:] == ["listFolder", "delete collection/c2"]
    assert [c["_id"] for c in girder.collections] == ["c1"]


def test_our_twin_is_left_when_another_consumer_put_something_in_it_already():
    girder = _Girder(twin_first=True, ours_used=True)
    assert _store(girder)._collection("lab")["_id"] == "c1"
    assert not any(call.startswith("delete") for call in girder.calls)
