"""Two consumers of one group uploading the same file at the same moment (a partition
moved while its old owner was still uploading) leave one item with one file, on the
real Girder."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.assembly.pieces import Pieces
from girder_upload_stream.shared_types import CompletedFile, Outcome
from girder_upload_stream.settings import GirderSettings
from tests.integration.girder_checks import download_item, folder_by_path, girder_listing

pytestmark = pytest.mark.integration


def completed(rel: str, data: bytes) -> CompletedFile:
    return CompletedFile(rel, hashlib.sha512(data).digest(), hashlib.sha256(data).hexdigest(),
                         len(data), 1, 0.0, 0.0, 0.0, Pieces([data]), None)


@pytest.mark.timeout(180)
def test_simultaneous_uploads_of_one_file_leave_one_item_with_one_file(
        stack_env, make_collection, girder_client):
    collection = make_collection()
    settings = GirderSettings(api_url=stack_env["GIRDER_API_URL"],
                              api_key=stack_env["GIRDER_API_KEY"],
                              collection_name=collection["name"], root_folder_path="race")
    stores = [GirderStore(settings, "race-topic") for _ in range(2)]
    rng = random.Random(3)
    files = {f"d{i % 3}/f{i}.bin": rng.randbytes(50_000 + i) for i in range(12)}
    outcomes: list[list] = [[], []]

    def upload(which: int, barrier: threading.Barrier, done: CompletedFile) -> None:
        barrier.wait()
        outcomes[which].append(stores[which].upload(done, shared=True))

    for rel, data in files.items():
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=upload, args=(w, barrier, completed(rel, data)))
                   for w in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for which in range(2):
        bad = [(o.rel_path, o.outcome, o.reason) for o in outcomes[which]
               if o.outcome not in (Outcome.UPLOADED, Outcome.SKIPPED_IDENTICAL)]
        assert not bad, bad
    root = folder_by_path(girder_client, f"/collection/{collection['name']}/race")
    listing = girder_listing(girder_client, root["_id"])
    assert sorted(rel for rel, _ in listing.items) == sorted(files)  # no "name (1)"
    for rel, item in listing.items:
        item_files = list(girder_client.listFile(item["_id"]))
        assert len(item_files) == 1, (rel, item_files)
        assert download_item(girder_client, item) == files[rel], rel
