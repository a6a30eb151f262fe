"""Girder requests per file against the real Girder, counted on the wire by the counting
proxy of ``make bench`` (:mod:`benchmarks.count_proxy`): a run of new small files costs at
most 2.2 requests per file (two per file, plus one per folder created), and the cases
that need more -- a re-delivered identical file, a different one skipped or replaced, a
twin check in a shared group, a folder deleted behind the cache -- still do what they
did: one item per name, its metadata untouched unless replaced.
"""

from __future__ import annotations

import hashlib

import pytest

from benchmarks.count_proxy import CountingProxy
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.shared_types import CompletedFile, Outcome
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.settings import GirderSettings
from tests.integration.girder_checks import (assert_exactly_once, default_root_path,
                                             download_item, folder_by_path, girder_tree)

pytestmark = pytest.mark.integration

TOPIC = "requests"


def _completed(rel: str, data: bytes) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(), hashlib.sha256(data).hexdigest(),
                         len(data), 1, 0.0, 0.0, 0.0, Pieces([data]), None)


def _files(n: int) -> dict[str, bytes]:
    """``n`` files of 64 KiB in three sub-folders two deep, as the benchmarks' trees."""
    return {f"d{i % 3}/e{i % 2}/f{i:03d}.dat": bytes([i % 256]) * (64 << 10)
            for i in range(n)}


@pytest.fixture
def proxied(stack_env, make_collection):
    """``(store_for(replace=False), proxy, collection)``: stores talking through the proxy."""
    collection = make_collection()
    with CountingProxy(stack_env["GIRDER_API_URL"]) as proxy:
        def store_for(replace: bool = False) -> GirderStore:
            store = GirderStore(GirderSettings(api_url=proxy.url,
                                               api_key=stack_env["GIRDER_API_KEY"],
                                               collection_name=collection["name"],
                                               replace_existing=replace), TOPIC)
            store.check()
            return store
        yield store_for, proxy, collection


def _upload_all(store: GirderStore, files: dict[str, bytes], shared: bool = False,
                known_there: bool = False):
    return {rel: store.upload(_completed(rel, data), shared, known_there).outcome
            for rel, data in files.items()}


@pytest.mark.timeout(300)
def test_new_small_files_cost_at_most_2_2_requests_each(proxied, girder_client):
    store_for, proxy, collection = proxied
    store = store_for()
    proxy.reset()
    files = _files(50)
    assert set(_upload_all(store, files).values()) == {Outcome.UPLOADED}
    per_file = proxy.total / len(files)
    print(f"[requests] {per_file:.2f} per new small file: {dict(proxy.counts)}")
    assert per_file <= 2.2, dict(proxy.counts)
    assert proxy.counts["POST item"] == proxy.counts["POST file"] == len(files)
    assert proxy.counts["POST folder"] == 3 + 6  # d0..d2, and e0/e1 below each
    assert not proxy.counts["POST file/chunk"], dict(proxy.counts)
    root = folder_by_path(girder_client, default_root_path(collection["name"], TOPIC))
    assert_exactly_once(girder_client, root["_id"], files, TOPIC)


@pytest.mark.timeout(300)
def test_redelivered_different_replaced_and_shared_files_behave_as_before(proxied,
                                                                          girder_client):
    store_for, proxy, collection = proxied
    store = store_for()
    files = _files(12)
    _upload_all(store, files)
    root = folder_by_path(girder_client, default_root_path(collection["name"], TOPIC))
    before = {rel: item["meta"] for rel, item in girder_tree(girder_client,
                                                             root["_id"]).items.items()}

    # Re-delivered, by this process and by a fresh one (no folder cache), shared or not.
    assert set(_upload_all(store, files).values()) == {Outcome.SKIPPED_IDENTICAL}
    assert set(_upload_all(store_for(), files, shared=True).values()) == \
        {Outcome.SKIPPED_IDENTICAL}
    # Listed in the registries as in Girder: looked up, no item made (nor renamed).
    proxy.reset()
    assert set(_upload_all(store, files, known_there=True).values()) == \
        {Outcome.SKIPPED_IDENTICAL}
    assert not proxy.counts["POST item"] and not proxy.counts["DELETE item"], \
        dict(proxy.counts)
    # Different contents under the same names: skipped, the items' metadata untouched.
    changed = {rel: b"v2" + data for rel, data in list(files.items())[:4]}
    assert set(_upload_all(store, changed).values()) == {Outcome.SKIPPED_DIFFERENT}
    tree = girder_tree(girder_client, root["_id"])
    assert {rel: item["meta"] for rel, item in tree.items.items()} == before
    assert_exactly_once(girder_client, root["_id"], files, TOPIC)

    # --replace_existing: replaced, with the new checksum.
    outcomes = _upload_all(store_for(replace=True), changed)
    assert set(outcomes.values()) == {Outcome.REPLACED}
    assert_exactly_once(girder_client, root["_id"], {**files, **changed}, TOPIC)

    # New files in a shared group: the twin checks, and still one item with one file.
    fresh = {f"shared/s{i}.dat": bytes([i]) * 1000 for i in range(5)}
    assert set(_upload_all(store, fresh, shared=True).values()) == {Outcome.UPLOADED}
    assert_exactly_once(girder_client, root["_id"], {**files, **changed, **fresh}, TOPIC)


@pytest.mark.timeout(300)
def test_a_folder_deleted_behind_the_cache_is_made_again(proxied, girder_client):
    store_for, proxy, collection = proxied
    store = store_for()
    first = {"gone/a/one.dat": b"one" * 100}
    _upload_all(store, first)
    root = folder_by_path(girder_client, default_root_path(collection["name"], TOPIC))
    gone = girder_tree(girder_client, root["_id"]).folders["gone"]
    girder_client.delete(f"folder/{gone['_id']}")  # someone deletes it in Girder
    second = {"gone/a/two.dat": b"two" * 100}
    assert _upload_all(store, second) == {"gone/a/two.dat": Outcome.UPLOADED}
    item = girder_tree(girder_client, root["_id"]).items["gone/a/two.dat"]
    assert download_item(girder_client, item) == second["gone/a/two.dat"]
    assert_exactly_once(girder_client, root["_id"], second, TOPIC)
