"""OpenMSIStream's test cases of Girder failures, and its restart case, re-created as
integration tests of ours: Girder (through the fault-injecting proxy of
:mod:`tests.integration.girder_faults`) answers 4xx or 5xx, or drops the connection, at
each step of an upload -- the item, the file, its chunks, the folder, the metadata, the
replaced contents.

What ours must do:

* transient (5xx, 429, a dropped connection): retried by the consumer's one retry policy
  (girder_upload_stream/retry_policy.py: 2, 10, 30 s, then up to 5 min; the tests here
  set a schedule of seconds, :data:`QUICK_RETRIES`); the file lands once; its messages
  stay uncommitted until it has;
* terminal (4xx) at a file's step: the file is registered ``failed`` with the reason,
  the commit moves on, and the next run of the same group reads the file's messages
  again and uploads it (offsets rule 9 of ``girder_upload_stream/offsets.py``).
"""

from __future__ import annotations

import io
import time

import pytest

from tests.integration.cases_support import (RETRIED_NEXT_RUN, Case, Finished,  # noqa: F401
                                             case)
from tests.integration.girder_faults import DROP
from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder,
                                             download_item, girder_tree)
from tests.integration.local_files import sha256
from tests.integration.programs import RETRY_LINE, wait_for

pytestmark = pytest.mark.integration

#: The retry schedule of the transient-error runs (timings.py): what is retried, and
#: what is held meanwhile, does not depend on the waits, which the unit tests check.
QUICK_RETRIES = {"GUS_TIMING_UPLOAD_RETRY_DELAYS": "1,2",
                 "GUS_TIMING_UPLOAD_RETRY_MAX_SECONDS": "2"}



def _described(case: Case, run: Finished) -> str:
    return run.program.describe((case.logs / "GirderUploadStreamProcessor.log",)) + \
        "\n--- proxy ---\n" + "\n".join(case.proxy.routes()[-80:])


def _assert_failed_for_a_restart(case: Case, run: Finished, rel: str, status: int,
                                 processed_before: int = 0) -> None:
    """The run ended normally with ``rel`` registered failed for the next run (and not
    processed: the processed registry lists ``rel`` as often as before), and its group
    committed to the end of the topic (the failed file holds nothing back)."""
    assert run.code == 0, _described(case, run)
    summary = run.summary()
    assert summary["failed"] == 1, (summary, _described(case, run))
    failed = case.failed_rows()
    assert list(failed) == [rel], (failed, _described(case, run))
    assert f"HTTP {status}" in failed[rel], failed
    assert failed[rel].endswith(RETRIED_NEXT_RUN), failed
    assert case.processed().count(rel) == processed_before, case.processed()
    assert not case.behind(), case.behind()
    assert any(";f=" in meta for meta in case.commit_metadata().values()), \
        case.commit_metadata()


# ------------------------------------------------------------------ terminal, then restart

def test_restart_with_the_same_group_uploads_the_file_that_failed(case: Case, girder_client):
    """OpenMSIStream: test_data_file_stream_processor_restart_kafka. Files 1 and 2 are
    produced; the first run fails file 1 (Girder answers 400 to its ``POST file``) and
    uploads file 2; file 3 is produced; a second run of the same group, Girder healthy,
    uploads files 1 and 3 and does not process file 2 again."""
    file1, file2, file3 = ("test_file_sub_dir/1a0ceb89.dat", "4ceee043.dat",
                           "fake_prod.config")
    files = {file1: bytes(range(256)) * 700, file2: b"second file\n" * 9000,
             file3: b"[broker]\nbootstrap.servers = nowhere\n"}
    case.produce({file1: files[file1], file2: files[file2]})
    fault = case.proxy.fail("POST file", 400, name="1a0ceb89.dat")
    first = case.run()
    _assert_failed_for_a_restart(case, first, file1, 400)
    assert first.summary()["uploaded"] == 1 and case.processed() == [file2]
    assert complete_in_girder(girder_client, case.root["_id"], files) == {file2}

    case.produce({file3: files[file3]})
    fault.disarm()
    mark = len(case.proxy.seen)
    second = case.run()
    assert second.code == 0, _described(case, second)
    summary = second.summary()
    assert (summary["uploaded"], summary["skipped"], summary["failed"]) == (2, 0, 0), \
        (summary, _described(case, second))
    assert sorted(case.processed()) == sorted(files), case.processed()
    assert not case.failed_rows(), case.failed_rows()
    run2 = case.proxy.seen[mark:]
    assert not [s for s in run2 if s.name == file2 and s.route in ("POST item", "POST file")], \
        "the second run uploaded file 2 again"
    assert_exactly_once(girder_client, case.root["_id"], files, case.topic)
    assert not case.behind(), case.behind()


STEPS = {  # step: (route, status answered, the name the rule matches, the failed file)
    "item": ("POST item", 400, "victim.bin", "victim.bin"),  # at the producer's root
    # A small file's bytes travel in its POST file (no POST file/chunk).
    "file": ("POST file", 403, "victim.bin", "victim_dir/victim.bin"),
    "folder": ("POST folder", 400, "victim_dir", "victim_dir/victim.bin"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_4xx_at_a_step_fails_the_file_and_the_next_run_uploads_it(case: Case, step,
                                                                    girder_client):
    """OpenMSIStream: test_girder_upload_failure_direct and the folder part of
    test_girder_odd_failures, with a 4xx at each step of one file's upload; the other
    files land, and the restart of the group uploads the failed one (also at the
    producer's root, which OpenMSIStream's restart never reads again: see the facts)."""
    route, status, name, victim = STEPS[step]
    files = {victim: bytes(range(200)) * 500, "ok.txt": b"fine\n",
             "ok_dir/ok2.bin": b"\x07" * 70_000}
    case.produce(files)
    fault = case.proxy.fail(route, status, name=name)
    first = case.run()
    _assert_failed_for_a_restart(case, first, victim, status)
    assert fault.hits >= 1
    assert complete_in_girder(girder_client, case.root["_id"], files) == set(files) - {victim}

    fault.disarm()
    second = case.run()
    assert second.code == 0, _described(case, second)
    assert (second.summary()["uploaded"], second.summary()["failed"]) == (1, 0), \
        (second.summary(), _described(case, second))
    assert not case.failed_rows()
    assert_exactly_once(girder_client, case.root["_id"], files, case.topic)
    assert not case.behind(), case.behind()


# ------------------------------------------------------------------ transient

TRANSIENT = [  # (route, status or DROP, times, the name the rule matches, file)
    ("POST item", 503, 2, "a.txt", "a.txt"),
    ("POST file", 502, 1, "b.txt", "b.txt"),
    ("POST file", 500, 1, "c.txt", "c.txt"),
    ("POST file", DROP, 1, "d.bin", "d.bin"),  # its bytes are in that request
    ("POST folder", 429, 1, "e_dir", "e_dir/e.txt"),
    ("POST item", 504, 1, "f.txt", "f.txt"),  # a new file sends no GET item
]


@pytest.mark.timeout(600)
def test_transient_errors_at_each_step_are_retried_and_each_file_lands_once(case: Case,
                                                                            girder_client):
    """OpenMSIStream: test_girder_retry_on_timeout (a 502 to ``POST file``, then success)
    and test_girder_upload_failure_direct's 500, at every step: 5xx, 429 and a dropped
    connection are retried until each file is in Girder, once, and nothing fails."""
    files = {rel: f"{rel} content\n".encode() * 50 for *_, rel in TRANSIENT}
    files["d.bin"] = bytes(range(256)) * 600  # several of the producer's chunks
    case.produce(files)
    faults = [case.proxy.fail(route, status, times=times, name=name)
              for route, status, times, name, _ in TRANSIENT]
    run = case.run(timeout=540, timings=QUICK_RETRIES)
    assert run.code == 0, _described(case, run)
    summary = run.summary()
    assert (summary["uploaded"], summary["failed"]) == (len(files), 0), \
        (summary, _described(case, run))
    assert [f.hits for f in faults] == [t[2] for t in TRANSIENT], _described(case, run)
    assert RETRY_LINE.search(run.text), _described(case, run)
    assert not case.failed_rows(), case.failed_rows()
    assert_exactly_once(girder_client, case.root["_id"], files, case.topic)
    assert not case.behind(), case.behind()


@pytest.mark.timeout(300)
def test_a_lasting_5xx_holds_the_files_messages_until_girder_answers(case: Case,
                                                                     girder_client):
    """Girder answers 503 to every ``POST file`` of one file for a while: the other files
    land and are committed, the file's own messages stay uncommitted, and once Girder
    answers again the file lands in the same run, once (differs on purpose: OpenMSIStream
    gives up after its five quick retries and leaves the file to its next run)."""
    victim = {"victim.bin": bytes(range(256)) * 400}
    others = {f"other{i}.txt": f"other {i}\n".encode() * 40 for i in range(4)}
    where = case.produce(victim, partition=0)
    for i, (rel, data) in enumerate(others.items()):  # behind it on 0, and alone on 1
        case.produce({rel: data}, partition=i % 2)
    fault = case.proxy.fail("POST file", 503, name="victim.bin")
    program = case.start(case.argv(), timings=QUICK_RETRIES)
    wait_for(lambda: complete_in_girder(girder_client, case.root["_id"], others) == set(others)
             and fault.hits >= 2, "the other files in Girder and a retry of the held one",
             program, timeout=120)
    time.sleep(3)  # commits happen at most once a second
    first_offset = min(offset for _, offset in where["victim.bin"])
    held = case.committed()
    assert held.get(0, -1) <= first_offset, (held, where)
    assert held.get(1) == case.end()[1], (held, case.end())
    fault.disarm()
    run = case.finish(program)
    assert run.code == 0, _described(case, run)
    summary = run.summary()
    assert (summary["uploaded"], summary["failed"]) == (5, 0), (summary, _described(case, run))
    assert_exactly_once(girder_client, case.root["_id"], {**victim, **others}, case.topic)
    assert not case.behind(), case.behind()


# ------------------------------------------------------------------ replace, metadata

def _contents(girder_client, case: Case, rel: str) -> tuple[bytes, dict, int]:
    item = girder_tree(girder_client, case.root["_id"]).items[rel]
    n_files = len(list(girder_client.listFile(item["_id"])))
    return download_item(girder_client, item), item.get("meta") or {}, n_files


def test_replace_existing(case: Case, girder_client):
    """OpenMSIStream: test_girder_replace_existing. Version 1 lands; produced again it is
    skipped; version 2 is skipped with a warning without ``--replace_existing``; with it,
    a 400 to ``PUT file/:id/contents`` fails the file (still version 1) and the next run
    of the group replaces it: one item, one file, the new version, its checksum.
    (The version replaced is a third one, never produced before: the case of the
    version skipped before and produced again is the test below.)"""
    rel, v1, v2 = "versioned.txt", b"Version 1 content", b"Version 2 content (different)"
    v3 = b"Version 3 content (replaces)"
    case.produce({rel: v1})
    run = case.run()
    assert run.code == 0 and run.summary()["uploaded"] == 1, _described(case, run)

    case.produce({rel: v1})
    case.produce({rel: v2})
    run = case.run()
    # v1 again: already in Girder; v2: skipped as a different file (counted apart).
    assert run.code == 0 and run.summary()["skipped"] == 1, _described(case, run)
    assert "1 skipped as a different file of that name is in Girder" in run.text, \
        _described(case, run)
    assert "--replace_existing" in run.text, _described(case, run)
    assert _contents(girder_client, case, rel)[::2] == (v1, 1)

    case.produce({rel: v3})
    fault = case.proxy.fail("PUT file/:id/contents", 400)
    run = case.run("--replace_existing")
    _assert_failed_for_a_restart(case, run, rel, 400, processed_before=3)
    assert _contents(girder_client, case, rel)[::2] == (v1, 1)

    fault.disarm()
    run = case.run("--replace_existing")
    assert run.code == 0 and run.summary()["uploaded"] == 1, _described(case, run)
    data, meta, n_files = _contents(girder_client, case, rel)
    assert (data, n_files) == (v3, 1)
    assert meta.get("checksum") == {"sha256": sha256(v3)}, meta
    assert not case.failed_rows() and not case.behind()


def _put_item(girder_client, case: Case, rel: str, data: bytes) -> None:
    """An item already in Girder below the root (as an earlier upload left it)."""
    parent = case.root["_id"]
    *folders, name = rel.split("/")
    for folder in folders:
        parent = girder_client.createFolder(parent, folder, reuseExisting=True)["_id"]
    item = girder_client.createItem(parent, name, metadata={"checksum": {"sha256": sha256(data)}})
    girder_client.uploadFile(item["_id"], io.BytesIO(data), name, len(data))


def test_a_failed_replace_of_a_version_skipped_before_is_retried(case: Case, girder_client):
    """OpenMSIStream's test_girder_replace_existing replaces the very version it skipped
    before. Here: Girder holds version 1; version 2 is skipped (no
    ``--replace_existing``); produced again, its replace meets a 400, and the next run of
    the group replaces it after all."""
    rel, v1, v2 = "versioned.txt", b"Version 1 content", b"Version 2 content (different)"
    _put_item(girder_client, case, rel, v1)
    case.produce({rel: v2})
    run = case.run()
    assert run.code == 0 and run.summary()["skipped"] == 0, _described(case, run)
    assert "1 skipped as a different file of that name is in Girder" in run.text, \
        _described(case, run)
    case.produce({rel: v2})
    fault = case.proxy.fail("PUT file/:id/contents", 400)
    run = case.run("--replace_existing")
    _assert_failed_for_a_restart(case, run, rel, 400, processed_before=1)
    fault.disarm()
    run = case.run("--replace_existing")
    assert run.code == 0, _described(case, run)
    assert _contents(girder_client, case, rel)[::2] == (v2, 1)


def test_a_4xx_setting_metadata_fails_the_file_and_the_next_run_sets_it(case: Case,
                                                                        girder_client):
    """OpenMSIStream: the metadata part of test_girder_odd_failures (400 to
    ``PUT item/:id/metadata``). Ours sends that request only when it replaces a file's
    contents (a new item carries its metadata from the start), so the case is a replace:
    the file fails, and the next run leaves the item with the new contents *and* their
    metadata."""
    rel, old, new = "test_folder/odd_failure.txt", b"Odd failure, old", b"Odd failure test"
    _put_item(girder_client, case, rel, old)
    case.produce({rel: new})
    fault = case.proxy.fail("PUT item/:id/metadata", 400)
    run = case.run("--replace_existing")
    _assert_failed_for_a_restart(case, run, rel, 400)

    fault.disarm()
    run = case.run("--replace_existing")
    assert run.code == 0, _described(case, run)
    data, meta, n_files = _contents(girder_client, case, rel)
    assert (data, n_files) == (new, 1)
    assert meta.get("checksum") == {"sha256": sha256(new)}, \
        f"the item holds the new contents but not their checksum: {meta}"
    assert meta.get("KafkaTopic") == case.topic, meta
    assert not case.failed_rows() and not case.behind()
