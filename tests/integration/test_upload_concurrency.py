"""Upload concurrency against the real Girder, through the counting proxy of ``make
bench`` (:mod:`benchmarks.count_proxy`) made a remote Girder (a delay per request):
small files upload side by side, more at once than ``--n_threads`` but never more
than ``--max_parallel_uploads``; with a Girder refusing some requests (503) the limit
comes down, and every file still lands once. Not timed."""

from __future__ import annotations

import pytest

from benchmarks.count_proxy import CountingProxy
from girder_upload_stream.errors import TransientError
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.ledger.units import UploadChannel, UploadUnit
from girder_upload_stream.shared_types import Outcome
from girder_upload_stream.loop.executor import ThreadUploads
from girder_upload_stream.loop.uploads import FileUploads, upload_files
from girder_upload_stream.settings import GirderSettings
from tests.integration.girder_checks import (assert_exactly_once, default_root_path,
                                             folder_by_path)
from tests.integration.test_girder_requests import _completed, _files

pytestmark = pytest.mark.integration

TOPIC = "concurrency"


def _store(proxy: CountingProxy, stack_env, collection) -> GirderStore:
    store = GirderStore(GirderSettings(api_url=proxy.url, api_key=stack_env["GIRDER_API_KEY"],
                                       collection_name=collection["name"]), TOPIC)
    store.check()
    return store


def _units(files: dict[str, bytes], per_unit: int) -> list[UploadUnit]:
    items = [_completed(rel, data) for rel, data in files.items()]
    return [UploadUnit(i + 1, items[i * per_unit:(i + 1) * per_unit])
            for i in range(-(-len(items) // per_unit))]


@pytest.mark.timeout(300)
def test_a_remote_girder_gets_more_than_n_threads_and_at_most_the_maximum(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    files = _files(96)
    with CountingProxy(stack_env["GIRDER_API_URL"], delay=0.03) as proxy:
        store = _store(proxy, stack_env, collection)
        proxy.reset()
        with FileUploads(initial=2, maximum=6) as pool, \
                ThreadUploads(2, files=pool) as uploads:
            futures = [uploads.submit_upload(u, store) for u in _units(files, 48)]
            outcomes = [o for f in futures for o in f.result(timeout=240)]
    assert {o.outcome for o in outcomes} == {Outcome.UPLOADED} and len(outcomes) == 96
    print(f"[concurrency] proxy held at most {proxy.max_in_flight} request(s); pool "
          f"{pool.gate.max_in_flight}; limit {pool.gate.limit.snapshot()}")
    assert 2 < proxy.max_in_flight <= 6, proxy.max_in_flight
    assert pool.gate.max_in_flight <= 6
    root = folder_by_path(girder_client, default_root_path(collection["name"], TOPIC))
    assert_exactly_once(girder_client, root["_id"], files, TOPIC)


@pytest.mark.timeout(300)
def test_a_failing_girder_lowers_the_limit_and_every_file_lands_once(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    files = _files(60)
    with CountingProxy(stack_env["GIRDER_API_URL"], delay=0.01) as proxy:
        store = _store(proxy, stack_env, collection)
        proxy.fail_every = 9  # from now on every 9th request is answered 503
        [unit] = _units(files, 60)
        unit.channel = UploadChannel()
        with FileUploads(initial=8, maximum=8) as pool:
            for _ in range(30):  # as the ledger does: what did not land, again
                try:
                    upload_files(unit, store, pool)
                    break
                except TransientError:
                    landed = {o.file_key for _, o in unit.channel.drain()}
                    unit.files = [f for f in unit.files if f.file_key not in landed]
            else:
                pytest.fail("the files never landed")
    limit = pool.gate.limit.snapshot()
    print(f"[concurrency] with 1 request in 9 refused: {limit}; proxy statuses "
          f"{dict(proxy.statuses)}, at most {proxy.max_in_flight} in flight")
    assert proxy.statuses[503] > 0 and limit.decreases_for_errors > 0
    assert limit.lowest < 8 and proxy.max_in_flight <= 8
    root = folder_by_path(girder_client, default_root_path(collection["name"], TOPIC))
    assert_exactly_once(girder_client, root["_id"], files, TOPIC)
