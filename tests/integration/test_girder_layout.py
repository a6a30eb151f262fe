"""What lands in Girder, checked against the real OpenMSIStream 1.8.8 on the same Girder.

1. Side by side: one produced tree is consumed by OpenMSIStream's
   ``GirderUploadStreamProcessor`` into collection ``O`` and by ours into collection
   ``U`` (both created by the consumer), with the default root path and with
   ``--girder_root_folder_path P1/P2``. Both collections must hold the same folders and
   items at the same paths (``O``/``U`` read as one name), with the same folder and item
   metadata (the version's value aside), file names and mimetypes, and be public.
2. Names Girder strips (``' spaced name.txt '``, a sub-folder ``' sub '``): produced
   twice and read by several groups, each is one item with one file, and
   ``GirderStore.holds`` finds it; a name empty once stripped fails for good.
3. Requests per new small file, counted by ``GirderStore.requests``.

OpenMSIStream (GPL) runs only as a black box, from ``.venv-openmsistream``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from girder_upload_stream.girder.ownership import OWNER_FIELD
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.shared_types import CompletedFile, Outcome
from girder_upload_stream.settings import GirderSettings
from tests.integration.girder_checks import (VERSION_FIELD, assert_exactly_once, complete_in_girder, default_root_path, folder_by_path, girder_listing, root_folder_or_none)
from tests.integration.local_files import CHUNK_SIZE, write_tree
from tests.integration.programs import (OMSI_BIN, OUR_CLI, Program, finish, produce_ours, stop_line, wait_for, write_omsi_config)

pytestmark = pytest.mark.integration

METADATA = '{"lab": "side by side", "n": 3}'
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3


def _tree() -> dict[str, bytes]:
    return {
        "notes.txt": b"calibration notes\n",
        "image.png": PNG,
        "table.csv": b"x;y\n1;2\n",
        "blob.unknownext42": b"\x00\x01 unknown type",
        " spaced name.txt ": b"a name with spaces around it\n",
        "run 1/ spaced sub /frame.raw": bytes(range(256)) * (CHUNK_SIZE // 128 + 3),
        "run 1/inner.json": b'{"k": 1}',
    }


def _stored(rel: str) -> str:
    """A relative path as Girder stores it (each part stripped)."""
    return "/".join(part.strip() for part in rel.split("/"))


def _delete_collection(gc, name: str) -> None:
    try:
        found = gc.get("resource/lookup", parameters={"path": f"/collection/{name}"})
    except Exception:  # noqa: BLE001 - Girder answers 400: never created
        return
    gc.delete(f"collection/{found['_id']}")


def _snapshot(gc, name: str) -> dict[str, Any]:
    """Everything below collection ``name`` with the collection's name in paths read as
    ``<C>`` and the version's value as ``<v>``: folders and items by path with their
    metadata, each item's files (name, size, mimetype), and whether it is public. Our
    owner mark (``gusCreatedBy``, which 1.8.8 does not write) is set apart: ``marked``
    lists the paths that carry it."""
    collection = gc.get("resource/lookup", parameters={"path": f"/collection/{name}"})
    listing = girder_listing(gc, collection["_id"], "collection")

    def norm_path(rel: str) -> str:
        return "/".join("<C>" if part == name else part for part in rel.split("/"))

    marked = set()

    def norm_meta(meta: dict | None, rel: str) -> dict:
        meta = dict(meta or {})
        if VERSION_FIELD in meta:
            meta[VERSION_FIELD] = "<v>"
        if meta.pop(OWNER_FIELD, None):
            marked.add(norm_path(rel))
        return meta

    folders = {norm_path(rel): norm_meta(doc.get("meta"), rel) for rel, doc in listing.folders}
    items = {}
    for rel, doc in listing.items:
        files = sorted((f["name"], f["size"], f.get("mimeType")) for f in gc.listFile(doc["_id"]))
        items[norm_path(rel)] = (norm_meta(doc.get("meta"), rel), files)
    assert len(folders) == len(listing.folders) and len(items) == len(listing.items), \
        f"same-named siblings in {name}: {listing}"
    return {"public": collection["public"], "folders": folders, "items": items,
            "marked": marked,
            "versions": sorted({str((doc.get("meta") or {}).get(VERSION_FIELD))
                                for _, doc in listing.folders + listing.items
                                if VERSION_FIELD in (doc.get("meta") or {})})}


def _run_openmsistream(tmp_path: Path, stack_env, topic: str, collection: str,
                       root_path: str, n_files: int, *extra: str) -> None:
    """OpenMSIStream's consumer until the tree is at ``root_path``, then ``q``."""
    config = write_omsi_config(tmp_path / "omsi.config", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    out = tmp_path / f"omsi-out-{len(list(tmp_path.glob('omsi-out-*')))}"
    program = Program(
        [OMSI_BIN / "GirderUploadStreamProcessor", stack_env["GIRDER_API_URL"],
         stack_env["GIRDER_API_KEY"], "--config", config, "--topic_name", topic,
         "--collection_name", collection, "--consumer_group_id", f"omsi-{out.name}-{topic}",
         "--output_dir", out, "--update_seconds", "-1", "--metadata", METADATA, *extra],
        tmp_path / f"{out.name}.log", cwd=tmp_path)
    try:
        from girder_client import GirderClient
        gc = GirderClient(apiUrl=stack_env["GIRDER_API_URL"])
        gc.authenticate(apiKey=stack_env["GIRDER_API_KEY"])

        def landed() -> bool:
            root = root_folder_or_none(gc, root_path)
            if root is None:
                return False
            listing = girder_listing(gc, root["_id"])
            return len(listing.items) >= n_files and all(
                item.get("size") and (item.get("meta") or {}).get("checksum")
                for _, item in listing.items)

        wait_for(landed, f"OpenMSIStream's uploads at {root_path}", program, timeout=120)
    finally:
        program.stop(timeout=30)


def _run_ours(tmp_path: Path, stack_env, prefect_env, topic: str, collection: str,
              *extra: str) -> dict[str, Any]:
    out = tmp_path / f"ours-out-{len(list(tmp_path.glob('ours-out-*')))}"
    env = {**os.environ, **prefect_env, "GIRDER_API_KEY": stack_env["GIRDER_API_KEY"],
           "KAFKA_BOOTSTRAP_SERVERS": stack_env["KAFKA_BOOTSTRAP_SERVERS"],
           "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run(
        [str(OUR_CLI), "run", stack_env["GIRDER_API_URL"], "--topic_name", topic,
         "--collection_name", collection, "--consumer_group_id", f"ours-{out.name}-{topic}",
         "--output_dir", str(out), "--max_idle_seconds", "3", "--metadata", METADATA, *extra],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=180)
    assert run.returncode == 0, f"our run failed:\n{run.stdout}\n{run.stderr}"
    return stop_line(run.stdout)


@pytest.mark.timeout(600)
def test_root_folder_layout_metadata_and_mimetypes_match_openmsistream(
        tmp_path, stack_env, prefect_env, make_topic, girder_client, request):
    topic = make_topic(partitions=2)
    files = write_tree(tmp_path / "tree", _tree())
    finish(produce_ours(tmp_path / "tree", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                        tmp_path), "our produce")
    suffix = topic.rsplit("-", 1)[-1]
    theirs, ours = f"gus-omsi-{suffix}", f"gus-ours-{suffix}"
    for name in (theirs, ours):
        request.addfinalizer(lambda name=name: _delete_collection(girder_client, name))

    # The default root path '{collection_name}/{topic_name}', then --girder_root_folder_path.
    _run_openmsistream(tmp_path, stack_env, topic, theirs,
                       default_root_path(theirs, topic), len(files))
    summary = _run_ours(tmp_path, stack_env, prefect_env, topic, ours)
    assert summary["uploaded"] == len(files) and summary["failed"] == 0, summary
    _run_openmsistream(tmp_path, stack_env, topic, theirs, f"/collection/{theirs}/P1/P2",
                       len(files), "--girder_root_folder_path", "P1/P2")
    summary = _run_ours(tmp_path, stack_env, prefect_env, topic, ours,
                        "--girder_root_folder_path", "P1/P2")
    assert summary["uploaded"] == len(files) and summary["failed"] == 0, summary

    expected, got = _snapshot(girder_client, theirs), _snapshot(girder_client, ours)
    print(f"[layout] OpenMSIStream: {sorted(expected['folders'])}; versions "
          f"{expected['versions']} vs ours {got['versions']}")
    # Facts of 1.8.8 this test relies on (a change of OpenMSIStream would show here).
    assert expected["public"] is True
    assert expected["folders"]["<C>"] == {}, "1.8.8 gives the first folder no metadata"
    assert set(expected["folders"]) >= {"<C>", f"<C>/{topic}", "P1", "P1/P2"}
    rels = {_stored(rel) for rel in files}
    assert set(expected["items"]) == ({f"<C>/{topic}/{rel}" for rel in rels}
                                      | {f"P1/P2/{rel}" for rel in rels})
    # Ours lands at the same paths, with the same metadata, names and mimetypes.
    assert got["public"] == expected["public"]
    assert got["folders"] == expected["folders"]
    assert got["items"] == expected["items"]
    # ... plus our owner mark on everything we created (the metadata-less first folder
    # of the default root path aside, as 1.8.8 leaves it).
    assert expected["marked"] == set()
    assert got["marked"] == (set(got["folders"]) | set(got["items"])) - {"<C>"}
    mimetypes = {rel: files_[0][2] for rel, (_, files_) in got["items"].items()}
    assert mimetypes[f"<C>/{topic}/image.png"] == "image/png"
    assert mimetypes[f"<C>/{topic}/table.csv"] == "text/csv"
    assert mimetypes["P1/P2/blob.unknownext42"] == "application/octet-stream"
    # The item's name is stripped by Girder; its file keeps the produced name, and the
    # mimetype is guessed from that (".txt " is no known extension), as 1.8.8 does.
    spaced = got["items"][f"<C>/{topic}/spaced name.txt"][1][0]
    assert spaced[::2] == (" spaced name.txt ", "application/octet-stream"), spaced


# ---------------------------------------------------------------- names Girder strips

def _completed(rel: str, data: bytes) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(), hashlib.sha256(data).hexdigest(),
                         len(data), 1, 0.0, 0.0, 0.0, Pieces([data]), None)


@pytest.fixture
def run_flow(stack_env, prefect_env, tmp_path, monkeypatch):
    """The flow in-process until idle, on the stack (the key by environment)."""
    from girder_upload_stream.flows.upload_stream import upload_stream
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack_env["KAFKA_BOOTSTRAP_SERVERS"])
    monkeypatch.setenv("GIRDER_API_KEY", stack_env["GIRDER_API_KEY"])
    runs = iter(range(1, 100))

    def run(topic: str, **options: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            topic_name=topic, config="local", girder_api_url=stack_env["GIRDER_API_URL"],
            output_dir=str(tmp_path / f"out{next(runs)}"), max_idle_seconds=3,
            max_runtime_seconds=120, interactive=False)
        kwargs.update(options)
        return upload_stream(**kwargs)

    return run


@pytest.mark.prefect  # the flow, in-process
@pytest.mark.timeout(300)
def test_names_with_spaces_redelivered_land_once_and_are_found(
        tmp_path, stack_env, make_topic, make_group, make_collection, girder_client, run_flow):
    topic, collection = make_topic(partitions=2), make_collection()
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    files = write_tree(tmp_path / "tree", {
        " spaced name.txt ": b"spaces around the name\n",
        " sub /inner.txt": b"in a spaced sub-folder\n",
        " sub / deeper /x.bin": bytes(range(200)) * 700,  # 3 chunks
        "sub/plain.txt": b"a folder 'sub' without spaces: the same folder\n",
    })
    expected = {_stored(rel): data for rel, data in files.items()}
    group = make_group()
    for production in range(2):  # the same tree twice: every file is delivered twice
        finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path), "our produce")
        first = run_flow(topic, collection_name=collection["name"], consumer_group_id=group)
        assert first["files_failed"] == 0, first
        assert first["files_uploaded"] == (len(files) if production == 0 else 0), first
    # A new group reads both productions again: every file is already there.
    again = run_flow(topic, collection_name=collection["name"], consumer_group_id=make_group())
    assert again["files_uploaded"] == 0 and again["files_failed"] == 0, again
    assert again["files_skipped"] >= len(files), again

    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], expected, topic, root_path=root_path)

    # The restart lookup finds each file by the name it was produced with.
    settings = GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              collection_name=collection["name"])
    store = GirderStore(settings, topic)
    for rel, data in files.items():
        assert store.holds(rel, hashlib.sha512(data).digest()) is True, rel
        assert store.holds(rel, hashlib.sha512(data + b"other").digest()) is False, rel


@pytest.mark.timeout(120)
def test_a_name_empty_once_stripped_fails_for_good_with_its_reason(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    settings = GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              collection_name=collection["name"], root_folder_path="names")
    store = GirderStore(settings, "t")
    for rel in ("   ", "  /x.txt", "a/\t/y.txt"):
        outcome = store.upload(_completed(rel, b"data"))
        assert outcome.outcome is Outcome.FAILED_TERMINAL, (rel, outcome)
        assert "empty once Girder strips" in outcome.reason, outcome.reason
        assert store.holds(rel, hashlib.sha512(b"data").digest()) is False
    fine = store.upload(_completed("a/ok.txt", b"data"))
    assert fine.outcome is Outcome.UPLOADED, fine
    root = folder_by_path(girder_client, f"/collection/{collection['name']}/names")
    listing = girder_listing(girder_client, root["_id"])
    assert [rel for rel, _ in listing.items] == ["a/ok.txt"], listing
    assert [rel for rel, _ in listing.folders] == ["a"], listing


# ---------------------------------------------------------------- requests per file

@pytest.mark.timeout(120)
def test_requests_per_new_small_file(stack_env, make_collection, girder_client):
    collection = make_collection()
    settings = GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              collection_name=collection["name"])
    store = GirderStore(settings, "requests")
    store.check()
    at_start = store.requests
    n = 20
    started = time.monotonic()
    for i in range(n):
        outcome = store.upload(_completed(f"f{i:02d}.png", PNG + bytes([i])))
        assert outcome.outcome is Outcome.UPLOADED, outcome
    per_file = (store.requests - at_start) / n
    print(f"[requests] start-up (log in, collection, 2 root folders): {at_start}; "
          f"{per_file:g} per new small file; {(time.monotonic() - started) / n * 1e3:.0f} ms "
          f"per file")
    assert per_file == 2, per_file  # create item (with metadata), upload file (with its bytes)
    root = folder_by_path(girder_client, default_root_path(collection["name"], "requests"))
    assert len(complete_in_girder(girder_client, root["_id"], {
        f"f{i:02d}.png": PNG + bytes([i]) for i in range(n)})) == n
