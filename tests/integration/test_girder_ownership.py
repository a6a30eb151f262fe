"""On the real Girder: the consumer changes or deletes only what it created (issue 20
§2), a name Girder would rename has one outcome at every reading (§3), and a root
folder deleted or moved while running is looked up again (§6).

The store and the streamed-upload session are driven directly (no Kafka: what is
tested is what they do in Girder); "a person" is the test's own Girder client, which
uses the same account as the consumer, as a person in Girder's web pages would.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import pytest

from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.shared_types import CompletedFile, Outcome, StreamPlan
from girder_upload_stream.girder.errors import GirderRootFolderGone
from girder_upload_stream.girder.ownership import OWNER_FIELD, TAG_FIELD
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.girder.streaming import STREAM_BLOCK, SessionState, StreamSession
from girder_upload_stream.settings import GirderSettings
from tests.integration.girder_checks import download_item, folder_by_path, girder_listing
from tests.integration.girder_faults import FaultProxy

pytestmark = pytest.mark.integration


def completed(rel: str, data: bytes) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(), hashlib.sha256(data).hexdigest(),
                         len(data), 1, 0.0, 0.0, 0.0, Pieces([data]), None)


def make_store(stack_env, collection: dict, *, api_url: str | None = None,
               root_path: str = "root", **options) -> GirderStore:
    settings = GirderSettings(api_url=api_url or stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              collection_name=collection["name"],
                              root_folder_path=root_path, **options)
    store = GirderStore(settings, "ownership-topic")
    store.check()
    return store


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def names_below(gc, folder_id: str) -> tuple[list[str], list[str]]:
    """Every folder and item below ``folder_id``, as paths relative to it."""
    listing = girder_listing(gc, folder_id)
    return sorted(rel for rel, _ in listing.folders), sorted(rel for rel, _ in listing.items)


# ------------------------------------------------------------- §2: only what we created

@pytest.mark.timeout(120)
def test_what_the_consumer_creates_is_marked_and_a_persons_is_not(stack_env, make_collection,
                                                                  girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection)
    root = store.root_folder_id()
    theirs = girder_client.createFolder(root, "theirs", metadata={"person": "yes"})
    outcome = store.upload(completed("theirs/mine/a.txt", b"a"))
    assert outcome.outcome is Outcome.UPLOADED
    mine = folder_by_path(girder_client, f"/collection/{collection['name']}/root/theirs/mine")
    item = girder_client.getItem(outcome.item_id)
    assert store.owner.owns(item) and store.owner.owns(mine)
    assert item["meta"][OWNER_FIELD].startswith("gus1-")
    person = girder_client.getFolder(theirs["_id"])
    assert person["meta"] == {"person": "yes"}  # used as it is, metadata not rewritten
    assert not store.owner.owns(person)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replace", [False, True])
def test_an_empty_item_a_person_made_is_never_filled_or_deleted_unless_replacing(
        stack_env, make_collection, girder_client, replace):
    collection = make_collection()
    store = make_store(stack_env, collection, replace_existing=replace)
    root = store.root_folder_id()
    person = girder_client.createItem(root, "note.txt", metadata={"by": "hand"})
    for _ in range(2):  # a re-delivery, too
        outcome = store.upload(completed("note.txt", b"the file"))
        assert outcome.item_id == person["_id"]
    item = girder_client.getItem(person["_id"])
    files = list(girder_client.listFile(person["_id"]))
    _, items = names_below(girder_client, root)
    assert items == ["note.txt"]  # no "note.txt (1)", the person's item never deleted
    if replace:
        assert outcome.outcome in (Outcome.REPLACED, Outcome.SKIPPED_IDENTICAL)
        assert download_item(girder_client, item) == b"the file"
        assert OWNER_FIELD not in item["meta"] and item["meta"]["by"] == "hand"
    else:
        assert outcome.outcome is Outcome.SKIPPED_DIFFERENT
        assert files == [] and item["meta"] == {"by": "hand"}


def _uploaded_a_txt(stack_env, collection: dict, data: bytes):
    """A store on ``collection`` that uploaded ``a.txt``; its root folder id and the
    checksum metadata a leftover of that file claims."""
    store = make_store(stack_env, collection)
    root = store.root_folder_id()
    assert store.upload(completed("a.txt", data)).outcome is Outcome.UPLOADED
    return store, root, {"checksum": {"sha256": hashlib.sha256(data).hexdigest()}}


@pytest.mark.timeout(120)
def test_a_persons_look_alike_of_a_leftover_is_not_swept(stack_env, make_collection,
                                                         girder_client):
    """An empty ``a.txt (1)`` claiming the file's checksum is swept only if ours."""
    data = b"swept or not"
    store, root, checksum = _uploaded_a_txt(stack_env, make_collection(), data)
    alike = girder_client.createItem(root, "a.txt", metadata=checksum)  # "a.txt (1)"
    ours = girder_client.createItem(root, "a.txt",  # "a.txt (2)", as a killed run leaves it
                                    metadata={**checksum, **store.owner.mark()})
    assert (alike["name"], ours["name"]) == ("a.txt (1)", "a.txt (2)")
    assert store.upload(completed("a.txt", data)).outcome is Outcome.SKIPPED_IDENTICAL
    _, items = names_below(girder_client, root)
    assert items == ["a.txt", "a.txt (1)"]


@pytest.mark.timeout(120)
def test_the_restart_check_sweeps_what_a_killed_upload_left_and_nothing_else(
        stack_env, make_collection, girder_client):
    """A run killed between ``POST item`` of a file already in Girder (named ``a.txt (1)``
    by Girder) and the ``DELETE`` of that item leaves it; the next run finds the file by
    its restart check and uploads nothing, so the check sweeps it: ours only."""
    data = b"found on restart"
    store, root, checksum = _uploaded_a_txt(stack_env, make_collection(), data)
    ours = girder_client.createItem(root, "a.txt", metadata={**checksum, **store.owner.mark()})
    alike = girder_client.createItem(root, "a.txt", metadata=checksum)  # a person's
    ours_too = girder_client.createItem(root, "a.txt",
                                        metadata={**checksum, **store.owner.mark()})
    assert [ours["name"], alike["name"], ours_too["name"]] == [
        "a.txt (1)", "a.txt (2)", "a.txt (3)"]
    assert store.holds("a.txt", hashlib.sha512(data).digest()) is True
    _, items = names_below(girder_client, root)
    assert items == ["a.txt", "a.txt (2)"]
    assert store.holds("a.txt", hashlib.sha512(data).digest()) is True  # nothing more goes
    assert names_below(girder_client, root)[1] == ["a.txt", "a.txt (2)"]


@pytest.mark.timeout(120)
def test_a_file_that_fails_for_good_leaves_no_folder_made_for_it(stack_env, make_collection,
                                                                 girder_client):
    collection = make_collection()
    with FaultProxy(stack_env["GIRDER_API_URL"]) as proxy:
        store = make_store(stack_env, collection, api_url=proxy.url)
        root = store.root_folder_id()
        girder_client.createFolder(root, "theirs")
        assert store.upload(completed("kept/k.txt", b"k")).outcome is Outcome.UPLOADED
        proxy.fail("POST item", 403, name="refused.txt")
        for rel in ("new/deep/er/refused.txt", "theirs/mine/refused.txt",
                    "kept/sub/refused.txt"):
            outcome = store.upload(completed(rel, b"r"))
            assert outcome.outcome is Outcome.FAILED_TERMINAL and "403" in outcome.reason
    folders, items = names_below(girder_client, root)
    assert folders == ["kept", "theirs"] and items == ["kept/k.txt"], (folders, items)
    assert names_below(girder_client, folder_by_path(
        girder_client, f"/collection/{collection['name']}/root/theirs")["_id"]) == ([], [])
    # The folders are made again when a file needs them.
    assert store.upload(completed("new/deep/er/ok.txt", b"o")).outcome is Outcome.UPLOADED


def _plan(rel: str, data: bytes, held: dict, shared: bool = False) -> StreamPlan:
    """A streamed file whose in-order prefix is ``held['prefix']`` bytes of ``data``,
    its last chunk starting at ``held['last']``; ``held['done']``: no longer assembling."""
    def view():
        return None if held.get("done") else (len(data), held["prefix"], held["last"])

    def read(start: int, end: int) -> bytes | None:
        return None if held.get("done") else data[start:min(end, held["prefix"])]
    return StreamPlan(rel, hashlib.sha512(data).digest(), len(data), view, read,
                      lambda: shared)


BIG = STREAM_BLOCK * 2 + 1000


@pytest.mark.timeout(180)
def test_nothing_is_made_in_girder_before_a_block_of_the_prefix_is_in_hand(
        stack_env, make_collection, girder_client):
    """A last chunk (the size claimed) and less than a block from offset 0: the session
    waits; the file then completes without streaming and nothing was made for it."""
    collection = make_collection()
    store = make_store(stack_env, collection)
    data = bytes(BIG)
    held = {"prefix": STREAM_BLOCK // 2, "last": BIG - 1000}
    plan = _plan("waits/big.bin", data, held)
    looks = []
    counted = StreamPlan(plan.rel_path, plan.file_hash, plan.size,
                         lambda: looks.append(1) or plan.view(), plan.read, plan.shared)
    session = StreamSession(store, counted, "group")
    for _ in range(3):
        session.nudge()
    wait_for(lambda: len(looks) >= 3)  # it looked at the prefix, and waits
    assert session.state is SessionState.OPENING
    held["done"] = True
    session.nudge()
    wait_for(lambda: session.state is SessionState.NOT_STREAMED)
    assert names_below(girder_client, store.root_folder_id()) == ([], [])
    outcome = session.finish(completed("waits/big.bin", data), lambda: False)
    assert outcome.outcome is Outcome.UPLOADED


@pytest.mark.timeout(180)
def test_an_abandoned_stream_removes_its_item_and_the_empty_folders_made_for_it(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection)
    root = store.root_folder_id()
    theirs = girder_client.createFolder(root, "theirs")
    data = bytes(range(256)) * (BIG // 256)
    held = {"prefix": STREAM_BLOCK, "last": len(data) - 1000}
    session = StreamSession(store, _plan("theirs/a/b/big.bin", data, held), "group")
    wait_for(lambda: session.sent == STREAM_BLOCK)
    [item] = girder_client.listItem(store.folder_for("theirs/a/b"))
    assert item["meta"][TAG_FIELD] == "group" and store.owner.owns(item)
    session.abandon()
    session.abandoning.join(30)
    assert names_below(girder_client, theirs["_id"]) == ([], [])  # a, b and the item gone
    assert girder_client.getFolder(theirs["_id"])["_id"] == theirs["_id"]  # theirs stays


@pytest.mark.timeout(180)
def test_a_stream_never_takes_over_a_persons_empty_item(stack_env, make_collection,
                                                        girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection)
    root = store.root_folder_id()
    person = girder_client.createItem(root, "big.bin", metadata={"by": "hand"})
    data = bytes(BIG)
    held = {"prefix": STREAM_BLOCK * 2, "last": BIG - 1000}
    session = StreamSession(store, _plan("big.bin", data, held), "group")
    wait_for(lambda: session.state is SessionState.NOT_STREAMED)
    session.abandon()
    session.abandoning.join(30)
    assert girder_client.getItem(person["_id"])["meta"] == {"by": "hand"}
    assert list(girder_client.listFile(person["_id"])) == []
    assert names_below(girder_client, root) == ([], ["big.bin"])


@pytest.mark.timeout(180)
def test_a_verified_size_other_than_the_streams_uploads_the_file_whole(
        stack_env, make_collection, girder_client):
    """The upload was opened on the last chunk's claim; the verified file is shorter:
    it is uploaded whole into our item, never left half-finished."""
    collection = make_collection()
    store = make_store(stack_env, collection)
    claimed = bytes(BIG)
    held = {"prefix": STREAM_BLOCK, "last": BIG - 1000}
    session = StreamSession(store, _plan("size.bin", claimed, held), "group")
    wait_for(lambda: session.sent == STREAM_BLOCK)
    real = b"r" * (STREAM_BLOCK + 10)
    outcome = session.finish(completed("size.bin", real), lambda: False)
    assert outcome.outcome is Outcome.UPLOADED
    [item] = girder_client.listItem(store.root_folder_id())
    assert download_item(girder_client, item) == real
    assert TAG_FIELD not in item["meta"] and len(list(girder_client.listFile(item["_id"]))) == 1


# ----------------------------------------------------------- §3: names Girder renames

@pytest.mark.timeout(120)
@pytest.mark.parametrize("rel, folder", [("clash", "clash"), ("d/x.bin", "d/x.bin"),
                                         ("d/ spaced ", "d/spaced")])
def test_a_file_named_like_a_folder_fails_for_good_at_every_reading(
        stack_env, make_collection, girder_client, rel, folder):
    collection = make_collection()
    first = make_store(stack_env, collection)
    root = first.root_folder_id()
    parent = root
    for part in folder.split("/"):
        parent = girder_client.createFolder(parent, part, reuseExisting=True)["_id"]
    reasons = set()
    for store in (first, first, make_store(stack_env, collection)):  # re-read; a new group
        outcome = store.upload(completed(rel, b"a file named like a folder"))
        assert outcome.outcome is Outcome.FAILED_TERMINAL
        reasons.add(outcome.reason)
    [reason] = reasons
    assert "a folder named" in reason and "is already there" in reason
    listing = girder_listing(girder_client, root)
    assert listing.items == [], listing.items  # no "name (1)", "name (2)"...


@pytest.mark.timeout(120)
def test_a_folder_named_like_an_item_fails_for_good_too(stack_env, make_collection,
                                                        girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection)
    assert store.upload(completed("x", b"x")).outcome is Outcome.UPLOADED
    for _ in range(2):
        outcome = store.upload(completed("x/inner.txt", b"i"))
        assert outcome.outcome is Outcome.FAILED_TERMINAL
        assert "An item with that name already exists" in outcome.reason
    assert names_below(girder_client, store.root_folder_id()) == ([], ["x"])


# ------------------------------------------------------------- §6: the root folder

@pytest.mark.timeout(120)
def test_a_root_folder_given_by_path_and_deleted_is_made_again(stack_env, make_collection,
                                                                girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection, root_path="a/b")
    old = store.root_folder_id()
    assert store.upload(completed("d/one.txt", b"1")).outcome is Outcome.UPLOADED
    top = folder_by_path(girder_client, f"/collection/{collection['name']}/a")
    girder_client.delete(f"folder/{top['_id']}")
    for rel in ("d/two.txt", "three.txt"):
        assert store.upload(completed(rel, rel.encode())).outcome is Outcome.UPLOADED
    new = folder_by_path(girder_client, f"/collection/{collection['name']}/a/b")
    assert new["_id"] != old and store.root_folder_id() == new["_id"]
    assert sorted(rel for rel, _ in girder_listing(girder_client, new["_id"]).items) == [
        "d/two.txt", "three.txt"]


@pytest.mark.timeout(120)
def test_a_root_folder_given_by_path_and_moved_is_replaced_at_the_path(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    store = make_store(stack_env, collection, root_path="r")
    store.root_recheck_seconds = 0.0  # look it up at every file
    old = store.root_folder_id()
    assert store.upload(completed("d/one.txt", b"1")).outcome is Outcome.UPLOADED
    elsewhere = girder_client.createFolder(collection["_id"], "elsewhere",
                                           parentType="collection")
    girder_client.put(f"folder/{old}", parameters={"parentId": elsewhere["_id"],
                                                   "parentType": "folder"})
    assert store.upload(completed("d/two.txt", b"2")).outcome is Outcome.UPLOADED
    new = folder_by_path(girder_client, f"/collection/{collection['name']}/r")
    assert new["_id"] != old
    assert [rel for rel, _ in girder_listing(girder_client, new["_id"]).items] == ["d/two.txt"]
    assert [rel for rel, _ in girder_listing(girder_client, old).items] == ["d/one.txt"]


@pytest.mark.timeout(120)
def test_a_root_folder_given_by_id_deleted_stops_and_moved_is_kept(stack_env,
                                                                    make_collection,
                                                                    girder_client):
    collection = make_collection()
    given = girder_client.createFolder(collection["_id"], "given", parentType="collection")
    settings = GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              root_folder_id=given["_id"])
    store = GirderStore(settings, "ownership-topic")
    store.root_recheck_seconds = 0.0  # never used for a root given by id
    assert store.check() == given["_id"]
    assert store.upload(completed("d/one.txt", b"1")).outcome is Outcome.UPLOADED
    elsewhere = girder_client.createFolder(collection["_id"], "elsewhere",
                                           parentType="collection")
    girder_client.put(f"folder/{given['_id']}", parameters={"parentId": elsewhere["_id"],
                                                            "parentType": "folder"})
    assert store.upload(completed("d/two.txt", b"2")).outcome is Outcome.UPLOADED
    assert sorted(rel for rel, _ in girder_listing(girder_client, given["_id"]).items) == [
        "d/one.txt", "d/two.txt"]
    girder_client.delete(f"folder/{given['_id']}")
    errors = []

    def upload() -> None:  # as an upload thread meets it
        try:
            store.upload(completed("d/three.txt", b"3"))
        except GirderRootFolderGone as exc:
            errors.append(exc)
    thread = threading.Thread(target=upload)
    thread.start()
    thread.join(60)
    [error] = errors
    assert given["_id"] in str(error) and "given by id" in str(error)
    assert girder_client.get("resource/lookup", parameters={
        "path": f"/collection/{collection['name']}/elsewhere"})["_id"] == elsewhere["_id"]
    assert list(girder_client.listFolder(elsewhere["_id"])) == []  # not made again


@pytest.mark.timeout(300)
def test_the_cli_stops_with_exit_2_when_its_root_folder_by_id_is_deleted_and_a_rerun_uploads(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs):
    """End to end: the consumer runs with ``--girder_root_folder_id``; the folder is
    deleted while it runs; the next file stops it with one clear line and exit status 2,
    and that file is not committed: a rerun (given an existing folder) uploads it."""
    from tests.integration.programs import (Program, consumer_argv, consumer_env, finish,
                                            produce_ours, wait_for as wait_program)
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    given = girder_client.createFolder(collection["_id"], "given", parentType="collection")

    def produce(name: str, data: bytes) -> None:
        tree = tmp_path / f"tree-{name}"
        tree.mkdir()
        (tree / name).write_bytes(data)
        finish(produce_ours(tree, topic, bootstrap, tmp_path), "produce")

    def argv(root_id: str, out: str, max_idle: float) -> list:
        return [*consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                               tmp_path / out, group, "local", max_idle),
                "--girder_root_folder_id", root_id]
    produce("first.txt", b"first")
    running = Program(argv(given["_id"], "out1", 60), tmp_path / "run1.out", cwd=tmp_path,
                      env=consumer_env(stack_env, prefect_env))
    programs.append(running)
    wait_program(lambda: [i["name"] for i in girder_client.listItem(given["_id"])]
                 == ["first.txt"], "first.txt in Girder", running, timeout=120)
    girder_client.delete(f"folder/{given['_id']}")
    produce("second.txt", b"second")
    code = running.wait(120)
    output = running.output()
    assert code == 2, running.describe()
    assert f"error: the root folder {given['_id']} (given by id) is gone" in output, output
    assert "Traceback" not in output, output

    again = girder_client.createFolder(collection["_id"], "again", parentType="collection")
    rerun = Program(argv(again["_id"], "out2", 3), tmp_path / "run2.out", cwd=tmp_path,
                    env=consumer_env(stack_env, prefect_env))
    programs.append(rerun)
    assert rerun.wait(120) == 0, rerun.describe()
    assert "second.txt" in [i["name"] for i in girder_client.listItem(again["_id"])]
