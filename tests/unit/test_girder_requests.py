"""The request logic of :class:`GirderStore` against a fake Girder client: which requests a
new small file, a re-delivered one, a different one, a replaced one, a twin check and a
stale folder cache cost, and that every outcome and every item's metadata stay as they
were. The fake models only what the store relies on: Girder renames a new item whose
name is taken (``name (1)``), ``createFolder`` refuses a name taken by a folder or an item
(``reuseExisting`` returns the folder of that name), a ``POST file`` whose body is the
whole file answers with the finished file, an unknown folder id is a 400, every document
made through it has the store's user as ``creatorId``. The real Girder is exercised in
``tests/integration/test_girder_layout.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from girder_client import HttpError

from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.shared_types import CompletedFile, Outcome
from girder_upload_stream.girder import store as store_module
from girder_upload_stream.errors import FatalError, TerminalError, TransientError
from girder_upload_stream.girder.errors import GirderRootFolderGone
from girder_upload_stream.girder.ownership import OWNER_FIELD, Owner
from girder_upload_stream.girder.store import (GirderStore, GirderTransientError,
                                               item_was_there)
from girder_upload_stream.settings import GirderSettings

_ids = (f"{n:024x}" for n in itertools.count(1))
ME = "u" * 24  # the API key's user


def _http_error(status: int, message: str) -> HttpError:
    return HttpError(status=status, url="http://girder/api/v1/x", method="POST",
                     text=json.dumps({"message": message, "type": "rest"}))


class FakeGirder:
    """Folders, items and files in dicts; ``calls`` lists each request's method name."""

    def __init__(self) -> None:
        self.folders: dict[str, dict] = {"root": {"_id": "root", "name": "root", "meta": {}}}
        self.items: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.calls: list[str] = []
        self.finish_uploads = True

    # folders
    def createFolder(self, parent, name, parentType="folder", reuseExisting=False,
                     metadata=None):
        self.calls.append("createFolder")
        self._need_folder(parent)
        found = [f for f in self.folders.values() if f.get("parent") == parent
                 and f["name"] == name]
        if found and not reuseExisting:
            raise _http_error(400, "A folder with that name already exists here.")
        if any(i["folder"] == parent and i["name"] == name for i in self.items.values()):
            raise _http_error(400, "An item with that name already exists here.")
        folder = found[0] if found else {
            "_id": next(_ids), "name": name, "parent": parent, "meta": {}, "creatorId": ME}
        self.folders[folder["_id"]] = folder
        if metadata:
            folder["meta"].update(metadata)
        return dict(folder)

    def listFolder(self, parent, parentFolderType="folder", name=None, limit=None):
        self.calls.append("listFolder")
        return [dict(f) for f in self.folders.values() if f.get("parent") == parent
                and name in (None, f["name"])][:limit]

    def getFolder(self, folder_id):
        self.calls.append("getFolder")
        self._need_folder(folder_id)
        return dict(self.folders[folder_id])

    def _need_folder(self, folder_id):
        if folder_id not in self.folders:
            raise _http_error(400, f"Invalid folder id ({folder_id}).")

    # items
    def createItem(self, folder, name, description="", reuseExisting=False, metadata=None):
        self.calls.append("createItem")
        assert not reuseExisting, "reuseExisting would set our metadata on an existing item"
        self._need_folder(folder)
        taken = {i["name"] for i in self.items.values() if i["folder"] == folder} | {
            f["name"] for f in self.folders.values() if f.get("parent") == folder}
        stored, n = name, 0
        while stored in taken:
            n += 1
            stored = f"{name} ({n})"
        item = {"_id": next(_ids), "name": stored, "folder": folder, "meta": dict(metadata or {}),
                "size": 0, "creatorId": ME}
        self.items[item["_id"]] = item
        return dict(item)

    def listItem(self, folder, name=None, limit=None):
        self.calls.append("listItem")
        return [dict(i) for i in self.items.values() if i["folder"] == folder
                and name in (None, i["name"])][:limit]

    def addMetadataToItem(self, item_id, metadata):
        self.calls.append("addMetadataToItem")
        self.items[item_id]["meta"].update(metadata)

    def delete(self, path):
        self.calls.append(f"delete {path.split('/')[0]}")
        kind, doc_id = path.split("/")
        store = {"item": self.items, "file": self.files, "folder": self.folders}[kind]
        if doc_id not in store:
            raise _http_error(400, f"Invalid {kind} id ({doc_id}).")
        del store[doc_id]

    # files
    def listFile(self, item_id):
        self.calls.append("listFile")
        return [dict(f) for f in self.files.values() if f["itemId"] == item_id]

    def _add_file(self, item_id, name, data, mimetype):
        doc = {"_id": next(_ids), "itemId": item_id, "name": name, "size": len(data),
               "sha512": hashlib.sha512(data).hexdigest(), "mimeType": mimetype, "data": data}
        self.files[doc["_id"]] = doc
        self.items[item_id]["size"] += len(data)
        return dict(doc)

    def post(self, path, parameters=None, data=None, headers=None):
        self.calls.append(f"post {path}")
        assert path == "file" and parameters["parentType"] == "item"
        assert headers["Content-Type"] == "application/octet-stream"
        assert len(data) == parameters["size"]
        if not self.finish_uploads:
            return {"_id": next(_ids), "received": 0, "size": parameters["size"]}
        return self._add_file(parameters["parentId"], parameters["name"], data,
                              parameters["mimeType"])

    def uploadFile(self, item_id, stream, name, size, parentType="item", mimeType=None):
        self.calls.append("uploadFile")
        return self._add_file(item_id, name, stream.read(), mimeType)

    def uploadFileContents(self, file_id, stream, size):
        self.calls.append("uploadFileContents")
        data = stream.read()
        self.files[file_id].update(size=len(data), data=data,
                                   sha512=hashlib.sha512(data).hexdigest())

    # reading back
    def item(self, folder, name) -> dict:
        [item] = [i for i in self.items.values() if i["folder"] == folder and i["name"] == name]
        return item

    def content(self, item) -> list[bytes]:
        return [f["data"] for f in self.files.values() if f["itemId"] == item["_id"]]


def _completed(rel: str, data: bytes) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(), hashlib.sha256(data).hexdigest(),
                         len(data), 1, 0.0, 0.0, 0.0, Pieces([data]), None)


@pytest.fixture
def girder():
    return FakeGirder()


def _store(girder: FakeGirder, replace: bool = False) -> GirderStore:
    settings = GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key="k" * 40,
                              replace_existing=replace, metadata={"lab": "x"},
                              root_folder_id="root")
    store = GirderStore(settings, "topic")
    store._local.client = girder
    store.owner = Owner(ME)  # as the log-in says
    store._folders[""] = "root"  # the root as resolved at start
    store.root_recheck_seconds = 3600.0
    return store


def _upload(store, girder, rel, data, shared=False, known_there=False):
    girder.calls.clear()
    return store.upload(_completed(rel, data), shared, known_there), list(girder.calls)


def test_a_new_small_file_is_two_requests_with_its_metadata_and_mimetype(girder):
    store = _store(girder)
    outcome, calls = _upload(store, girder, "a.png", b"png bytes")
    assert outcome.outcome is Outcome.UPLOADED
    assert calls == ["createItem", "post file"]
    item = girder.item("root", "a.png")
    assert item["meta"]["checksum"] == {"sha256": hashlib.sha256(b"png bytes").hexdigest()}
    assert item["meta"]["lab"] == "x" and item["meta"]["KafkaTopic"] == "topic"
    [file] = girder.files.values()
    assert (file["name"], file["mimeType"], file["data"]) == ("a.png", "image/png", b"png bytes")
    assert store.requests == 2


def test_folders_are_one_request_each_then_cached(girder):
    store = _store(girder)
    _, calls = _upload(store, girder, "d1/d2/x.txt", b"x")
    assert calls == ["createFolder", "createFolder", "createItem", "post file"]
    _, calls = _upload(store, girder, "d1/d2/y.txt", b"y")
    assert calls == ["createItem", "post file"]
    d1 = next(f for f in girder.folders.values() if f["name"] == "d1")
    assert d1["meta"]["KafkaTopic"] == "topic" and "checksum" not in d1["meta"]


def test_a_redelivered_identical_file_is_skipped_and_leaves_one_item(girder):
    store = _store(girder)
    _upload(store, girder, "a.txt", b"same")
    before = dict(girder.item("root", "a.txt")["meta"])
    outcome, calls = _upload(store, girder, "a.txt", b"same")
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL
    # listItem "a.txt", then "a.txt (2)": a leftover above ours (renamed "a.txt (1)")?
    assert calls == ["createItem", "listItem", "delete item", "listItem", "listFile"]
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]
    assert girder.item("root", "a.txt")["meta"] == before


def test_a_different_file_is_skipped_and_the_items_metadata_is_untouched(girder):
    store = _store(girder)
    _upload(store, girder, "a.txt", b"old")
    before = dict(girder.item("root", "a.txt")["meta"])
    outcome, _ = _upload(store, girder, "a.txt", b"new")
    assert outcome.outcome is Outcome.SKIPPED_DIFFERENT
    item = girder.item("root", "a.txt")
    assert item["meta"] == before and girder.content(item) == [b"old"]
    assert len(girder.items) == 1


def test_replace_existing_swaps_contents_and_metadata(girder):
    store = _store(girder, replace=True)
    _upload(store, girder, "a.txt", b"old")
    outcome, calls = _upload(store, girder, "a.txt", b"new")
    assert outcome.outcome is Outcome.REPLACED
    assert calls[-2:] == ["uploadFileContents", "addMetadataToItem"]
    item = girder.item("root", "a.txt")
    assert girder.content(item) == [b"new"] and len(girder.items) == 1
    assert item["meta"]["checksum"]["sha256"] == hashlib.sha256(b"new").hexdigest()


def test_an_item_of_ours_left_without_its_file_is_filled(girder):
    store = _store(girder)
    left = girder.createItem("root", "a.txt", metadata={"other": 1, **Owner(ME).mark(),
                                                        "gusStreamingUpload": "g"})
    outcome, calls = _upload(store, girder, "a.txt", b"data")
    assert outcome.outcome is Outcome.UPLOADED and outcome.item_id == left["_id"]
    assert calls[-2:] == ["post file", "addMetadataToItem"]
    item = girder.item("root", "a.txt")
    assert girder.content(item) == [b"data"] and item["meta"]["KafkaTopic"] == "topic"
    assert item["meta"]["gusStreamingUpload"] is None  # Girder removes a key set to null


@pytest.mark.parametrize("meta, creator", [
    ({"other": 1}, ME),                                  # a person, with our account
    ({OWNER_FIELD: "gus1-" + "0" * 32}, ME),             # a mark that is not our token
    ({OWNER_FIELD: Owner(ME).token}, "someone" * 3),     # our token, another account
])
def test_an_empty_item_someone_else_made_is_never_filled_nor_deleted(girder, meta, creator):
    store = _store(girder)
    left = girder.createItem("root", "a.txt", metadata=meta)
    girder.items[left["_id"]]["creatorId"] = creator
    outcome, calls = _upload(store, girder, "a.txt", b"data")
    assert outcome.outcome is Outcome.SKIPPED_DIFFERENT and outcome.item_id == left["_id"]
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]
    item = girder.item("root", "a.txt")
    assert girder.content(item) == [] and item["meta"] == meta
    assert "addMetadataToItem" not in calls and "post file" not in calls


def test_replace_existing_fills_someone_elses_empty_item_without_marking_it(girder):
    store = _store(girder, replace=True)
    left = girder.createItem("root", "a.txt", metadata={"other": 1})
    outcome, _ = _upload(store, girder, "a.txt", b"data")
    assert outcome.outcome is Outcome.REPLACED and outcome.item_id == left["_id"]
    item = girder.item("root", "a.txt")
    assert girder.content(item) == [b"data"] and OWNER_FIELD not in item["meta"]
    assert item["meta"]["other"] == 1 and item["meta"]["KafkaTopic"] == "topic"


def test_what_the_consumer_creates_carries_its_mark(girder):
    store = _store(girder)
    _upload(store, girder, "d/e/a.txt", b"data")
    item = girder.item(store._folders["d/e"], "a.txt")
    assert Owner(ME).owns(item)
    assert all(Owner(ME).owns(girder.folders[store._folders[k]]) for k in ("d", "d/e"))


def test_an_existing_folder_is_used_and_its_metadata_left_as_it_is(girder):
    store = _store(girder)
    girder.createFolder("root", "d", metadata={"person": "yes"})
    outcome, calls = _upload(store, girder, "d/a.txt", b"data")
    assert outcome.outcome is Outcome.UPLOADED
    assert calls == ["createFolder", "listFolder", "createItem", "post file"]
    [folder] = [f for f in girder.folders.values() if f["name"] == "d"]
    assert folder["meta"] == {"person": "yes"}


@pytest.mark.parametrize("redeliveries", [1, 3])
def test_a_file_named_like_a_folder_fails_for_good_the_same_way_each_time(girder,
                                                                         redeliveries):
    """Girder would save the item as ``clash (1)``, and a re-read as ``clash (2)``...:
    the file fails for good, with its reason, every time, and leaves no item."""
    store = _store(girder)
    girder.createFolder("root", "clash", reuseExisting=True)
    for _ in range(redeliveries):
        outcome, calls = _upload(store, girder, "clash", b"data")
        assert outcome.outcome is Outcome.FAILED_TERMINAL
        assert "a folder named 'clash' is already there" in outcome.reason
        assert girder.items == {}
    assert calls == ["createItem", "listItem", "delete item", "listFolder"]


def _refuse_items(girder, status=403):
    def refuse(folder, name, **kw):
        girder.calls.append("createItem")
        raise _http_error(status, "Access denied.")
    girder.createItem = refuse


def test_a_file_that_fails_for_good_leaves_none_of_the_empty_folders_made_for_it(girder):
    store = _store(girder)
    _upload(store, girder, "keep/other.txt", b"x")  # a folder holding a file stays
    theirs = girder.createFolder("root", "theirs")  # a person's folder stays
    girder.folders[theirs["_id"]]["meta"] = {"person": 1}
    original = girder.createItem
    _refuse_items(girder)
    for rel in ("new/sub/x.txt", "keep/deeper/y.txt", "theirs/mine/z.txt"):
        outcome, _ = _upload(store, girder, rel, b"data")
        assert outcome.outcome is Outcome.FAILED_TERMINAL and "HTTP 403" in outcome.reason
    names = sorted(f["name"] for f in girder.folders.values())
    assert names == ["keep", "root", "theirs"], names
    assert "new" not in store._folders and "keep" in store._folders
    girder.createItem = original  # the folders are made again when a file needs them
    outcome, _ = _upload(store, girder, "new/sub/x.txt", b"data")
    assert outcome.outcome is Outcome.UPLOADED and "new/sub" in store._folders


def test_empty_folders_are_left_when_another_consumer_may_upload_into_them(girder):
    store = _store(girder)
    _refuse_items(girder)
    outcome, _ = _upload(store, girder, "new/x.txt", b"data", shared=True)
    assert outcome.outcome is Outcome.FAILED_TERMINAL
    assert sorted(f["name"] for f in girder.folders.values()) == ["new", "root"]


def test_a_folder_in_use_by_another_upload_of_the_process_is_not_pruned(girder):
    store = _store(girder)
    store.hold_folder("busy/inner")  # e.g. a streamed upload into it
    _refuse_items(girder)
    outcome, _ = _upload(store, girder, "busy/inner/x.txt", b"data")
    assert outcome.outcome is Outcome.FAILED_TERMINAL
    assert sorted(f["name"] for f in girder.folders.values()) == ["busy", "inner", "root"]
    store.release_folder("busy/inner")
    store.prune_folders("busy/inner")
    assert sorted(f["name"] for f in girder.folders.values()) == ["root"]


def test_an_item_vanishing_between_two_requests_is_transient(girder):
    store = _store(girder)
    left = girder.createItem("root", "a.txt", metadata={})
    original = girder.createItem

    def create_then_vanish(folder, name, **kw):
        made = original(folder, name, **kw)
        del girder.items[left["_id"]]
        return made
    girder.createItem = create_then_vanish
    with pytest.raises(GirderTransientError, match="vanished"):
        store.upload(_completed("a.txt", b"data"))


def test_shared_checks_twins_of_item_file_and_folders(girder):
    store = _store(girder)
    outcome, calls = _upload(store, girder, "d/a.txt", b"data", shared=lambda: True)
    assert outcome.outcome is Outcome.UPLOADED
    assert calls == ["createFolder", "listFolder", "createItem", "listItem", "post file",
                     "listFile"]


def test_a_file_alone_in_a_shared_group_checks_its_new_folders_but_not_its_item(girder):
    """A group re-keyed by file: no other member uploads this file, but another may
    create the same new folder for a file of its own (kafka/gain_marks.py)."""
    store = _store(girder)
    girder.calls.clear()
    outcome = store.upload(_completed("d/a.txt", b"data"), shared=False,
                           folders_shared=lambda: True)
    assert outcome.outcome is Outcome.UPLOADED
    assert girder.calls == ["createFolder", "listFolder", "createItem", "post file"]
    _refuse_items(girder)  # and its folders are left when it fails: they are shared
    outcome = store.upload(_completed("e/b.txt", b"data"), shared=False, folders_shared=True)
    assert outcome.outcome is Outcome.FAILED_TERMINAL
    assert "e" in {f["name"] for f in girder.folders.values()}


def test_a_folder_whose_partitions_move_while_it_is_made_is_checked_for_a_twin(girder):
    """The answer is asked once the folder is made: a revoke while ``POST folder`` was on
    its way (the next owner may make the same folder now) still brings the check. Asked
    before, a member holding every partition at a group's start left twin folders."""
    store = _store(girder)
    moved = []
    original = girder.createFolder

    def made_during_a_revoke(*args, **kw):
        made = original(*args, **kw)
        moved.append(True)  # the loop's revoke, while the request was on its way
        return made
    girder.createFolder = made_during_a_revoke
    girder.calls.clear()
    outcome = store.upload(_completed("d/a.txt", b"data"), shared=lambda: bool(moved))
    assert outcome.outcome is Outcome.UPLOADED
    assert girder.calls[:2] == ["createFolder", "listFolder"], girder.calls


def test_a_twin_item_made_at_the_same_moment_is_left_to_the_oldest(girder):
    store = _store(girder)
    oldest = girder.createItem("root", "a.txt", metadata=Owner(ME).mark())  # another consumer's
    original = girder.createItem
    # Another consumer's create landed between Girder's name check and its save: ours
    # keeps the name too (Girder's check is not atomic).
    girder.createItem = lambda folder, name, **kw: girder.items.setdefault(
        "f" * 24, {"_id": "f" * 24, "name": name, "folder": folder,
                   "meta": dict(kw["metadata"]), "size": 0}) and (
        girder.calls.append("createItem") or dict(girder.items["f" * 24]))
    outcome, _ = _upload(store, girder, "a.txt", b"data", shared=True)
    girder.createItem = original
    assert outcome.outcome is Outcome.UPLOADED and outcome.item_id == oldest["_id"]
    assert "f" * 24 not in girder.items
    assert girder.content(girder.items[oldest["_id"]]) == [b"data"]


def test_a_deleted_folder_is_resolved_again_once(girder):
    store = _store(girder)
    _upload(store, girder, "d/a.txt", b"a")
    folder_id = store._folders["d"]
    del girder.folders[folder_id]  # someone deleted it in Girder
    outcome, calls = _upload(store, girder, "d/b.txt", b"b")
    assert outcome.outcome is Outcome.UPLOADED
    # The root (given by id) is checked again too: any ancestor may be gone.
    assert calls == ["createItem", "getFolder", "createFolder", "createItem", "post file"]
    assert store._folders["d"] != folder_id and store._folders[""] == "root"


def test_a_root_folder_given_by_id_and_deleted_stops_the_run(girder):
    store = _store(girder)
    _upload(store, girder, "d/a.txt", b"a")
    girder.folders = {k: v for k, v in girder.folders.items() if k == "elsewhere"}
    with pytest.raises(GirderRootFolderGone, match="given by id"):
        store.upload(_completed("d/b.txt", b"b"))
    assert isinstance(GirderRootFolderGone("x"), FatalError)
    assert not issubclass(GirderRootFolderGone, (TransientError, TerminalError))


def test_a_big_file_goes_through_the_chunked_upload(girder, monkeypatch):
    monkeypatch.setattr(store_module, "SMALL_UPLOAD_BYTES", 4)
    store = _store(girder)
    outcome, calls = _upload(store, girder, "big.bin", b"12345")
    assert outcome.outcome is Outcome.UPLOADED
    assert calls == ["createItem", "uploadFile"]


def test_an_upload_girder_did_not_finish_is_transient(girder):
    store = _store(girder)
    girder.finish_uploads = False
    with pytest.raises(GirderTransientError, match="did not finish"):
        store.upload(_completed("a.txt", b"data"))


def test_item_was_there_reads_girders_rename():
    assert not item_was_there({"name": "a.txt"}, "a.txt")
    assert item_was_there({"name": "a.txt (1)"}, "a.txt")


def test_empty_items_left_by_a_killed_redelivery_are_swept(girder):
    """A process killed between ``POST item`` (renamed ``a.txt (1)``) and its ``DELETE``
    leaves an empty ``a.txt (1)`` claiming the file's checksum: the next delivery, renamed
    ``a.txt (2)``, deletes both; an unrelated ``a.txt (2)``-like item is left alone."""
    store = _store(girder)
    _upload(store, girder, "a.txt", b"same")
    checksum = {"checksum": {"sha256": hashlib.sha256(b"same").hexdigest()}}
    girder.createItem("root", "a.txt", metadata={**checksum, **Owner(ME).mark()})  # "a.txt (1)"
    other = girder.createItem("root", "a.txt", metadata={"checksum": {"sha256": "x"}})
    assert other["name"] == "a.txt (2)"
    alike = girder.createItem("root", "a.txt", metadata=checksum)  # a person's look-alike
    assert alike["name"] == "a.txt (3)"
    outcome, calls = _upload(store, girder, "a.txt", b"same")
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL
    assert sorted(i["name"] for i in girder.items.values()) == ["a.txt", "a.txt (2)",
                                                                "a.txt (3)"]
    assert calls.count("delete item") == 2  # ours ("a.txt (4)") and the leftover


def test_a_leftover_above_the_suffix_girder_gave_is_swept_too(girder):
    """Girder takes the first *free* suffix: with leftovers ``a.txt (1)`` and ``(2)`` of
    killed re-deliveries and ``(1)`` swept since (another delivery's sweep), the next
    re-delivery is renamed ``a.txt (1)`` again and must still find ``(2)``."""
    store = _store(girder)
    _upload(store, girder, "a.txt", b"same")
    checksum = {"checksum": {"sha256": hashlib.sha256(b"same").hexdigest()}}
    first = girder.createItem("root", "a.txt", metadata={**checksum, **Owner(ME).mark()})
    second = girder.createItem("root", "a.txt", metadata={**checksum, **Owner(ME).mark()})
    assert (first["name"], second["name"]) == ("a.txt (1)", "a.txt (2)")
    del girder.items[first["_id"]]
    outcome, calls = _upload(store, girder, "a.txt", b"same")
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]
    assert calls.count("delete item") == 2  # ours ("a.txt (1)") and the leftover "(2)"


def test_a_file_the_registry_lists_in_girder_is_looked_up_before_any_item_is_made(girder):
    """A new production of a listed file (or a re-read after a run listed it and was
    killed before its commit) never makes a renamed item: a kill before its DELETE
    would leave it for good, as no later reading of the file comes to Girder. A
    leftover of such a kill under the old way is swept on the way."""
    store = _store(girder)
    _upload(store, girder, "a.txt", b"same")
    checksum = {"checksum": {"sha256": hashlib.sha256(b"same").hexdigest()}}
    girder.createItem("root", "a.txt", metadata={**checksum, **Owner(ME).mark()})  # (1)
    outcome, calls = _upload(store, girder, "a.txt", b"same", known_there=True)
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL
    assert "createItem" not in calls
    # the item, "a.txt (1)" (a leftover: deleted), "a.txt (2)" (free), its file
    assert calls == ["listItem", "listItem", "delete item", "listItem", "listFile"]
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]


def test_a_listed_file_someone_deleted_from_girder_is_uploaded_again(girder):
    store = _store(girder)
    outcome, calls = _upload(store, girder, "a.txt", b"same", known_there=True)
    assert outcome.outcome is Outcome.UPLOADED
    assert calls == ["listItem", "createItem", "post file"]
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]


def test_a_renamed_item_another_member_swept_first_is_no_failure(girder):
    """Two members re-deliver one file: one's sweep may delete the other's renamed
    item before that member's own DELETE, which Girder then answers 400 "Invalid item
    id". The item is gone as wanted: the file is skipped as identical, not failed."""
    store = _store(girder)
    _upload(store, girder, "a.txt", b"same")
    delete = girder.delete

    def swept_first(path):
        delete(path)  # the other member's sweep
        delete(path)  # ours: the item is gone
    girder.delete = swept_first
    outcome, _ = _upload(store, girder, "a.txt", b"same")
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL, outcome.reason
    assert [i["name"] for i in girder.items.values()] == ["a.txt"]


@pytest.mark.parametrize("ours, replace, repaired", [(True, False, True), (False, False, False),
                                                     (False, True, True)])
def test_a_checksum_naming_other_bytes_is_corrected_only_where_allowed(girder, ours, replace,
                                                                       repaired):
    """Identical content under a checksum of other bytes (a replace whose metadata
    request failed): corrected on the consumer's items, and on others only with
    --replace_existing."""
    store = _store(girder, replace=replace)
    mark = Owner(ME).mark() if ours else {}
    item = girder.createItem("root", "a.txt", metadata={"checksum": {"sha256": "old"}, **mark})
    girder._add_file(item["_id"], "a.txt", b"data", "text/plain")
    outcome, _ = _upload(store, girder, "a.txt", b"data")
    assert outcome.outcome is Outcome.SKIPPED_IDENTICAL
    sha = girder.item("root", "a.txt")["meta"]["checksum"]["sha256"]
    assert sha == (hashlib.sha256(b"data").hexdigest() if repaired else "old")


def test_the_owner_mark_comes_from_the_key_never_from_metadata(girder):
    """--metadata cannot forge the mark onto an item the consumer only replaces."""
    settings = GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key="k" * 40,
                              replace_existing=True, root_folder_id="root",
                              metadata={OWNER_FIELD: Owner(ME).token})
    store = _store(girder)
    store.settings = settings
    person = girder.createItem("root", "a.txt", metadata={})
    girder._add_file(person["_id"], "a.txt", b"old", "text/plain")
    outcome, _ = _upload(store, girder, "a.txt", b"new")
    assert outcome.outcome is Outcome.REPLACED
    assert OWNER_FIELD not in girder.item("root", "a.txt")["meta"]
    _upload(store, girder, "d/b.txt", b"b")
    assert girder.item(store._folders["d"], "b.txt")["meta"][OWNER_FIELD] == Owner(ME).token


def test_the_restart_look_up_makes_no_folder(girder):
    store = _store(girder)
    data = b"looked up"
    girder.calls.clear()
    assert store.holds("new/deeper/x.txt", hashlib.sha512(data).digest()) is False
    assert girder.calls == ["listFolder"] and list(girder.folders) == ["root"]
    _upload(store, girder, "new/deeper/x.txt", data)
    store.forget_folders()
    girder.calls.clear()
    assert store.holds("new/deeper/x.txt", hashlib.sha512(data).digest()) is True
    # The last listItem: is "x.txt (1)" a leftover of a killed upload to sweep? (no)
    assert girder.calls == ["getFolder", "listFolder", "listFolder", "listItem", "listFile",
                            "listItem"]
