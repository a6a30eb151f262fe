"""What the real OpenMSIStream 1.8.8 ``GirderUploadStreamProcessor`` does in the cases of
``test_openmsistream_cases.py`` and ``test_openmsistream_faults.py``, through the same
fault-injecting proxy: the facts behind the differences that docs/migration.md lists.

OpenMSIStream (GPL) runs only as a black box, through its console script from
``.venv-openmsistream``; it has no idle stop, so each run is stopped with ``q`` once
what the test waits for has happened.
"""

from __future__ import annotations

import pytest

from tests.integration.cases_support import Case, case  # noqa: F401
from tests.integration.girder_checks import complete_in_girder, girder_tree
from tests.integration.local_files import in_progress_rows
from tests.integration.programs import wait_for

pytestmark = pytest.mark.integration

WRONG_KEY = "wrongkey" + "0" * 32


def _omsi_rows(case: Case) -> dict[str, str]:
    """``{relative path: status}`` of OpenMSIStream's in-progress registry."""
    return {str(row.rel_filepath): row.status
            for row in in_progress_rows(case.tmp / "omsi_out" / "LOGS", case.topic, case.group)}


def test_openmsistream_refuses_invalid_metadata_json_from_its_constructor(case: Case):
    """Its own test expects the JSONDecodeError: a traceback and exit 1."""
    case.produce({"waiting.txt": b"x"})
    program = case.start_openmsistream("--metadata", "this is not valid JSON")
    code = program.wait(90)
    output = program.output()
    print(f"[omsi invalid --metadata] exit {code}; last line: {output.strip().splitlines()[-1]!r}")
    assert code != 0 and "Expecting value" in output, output[-3000:]
    assert "Traceback" in output
    assert case.nothing_committed()


def test_openmsistream_with_a_wrong_key_and_a_collection_stops_at_startup(case: Case):
    """It looks the collection up from its constructor, so a wrong key stops it there."""
    case.produce({"waiting.txt": b"x"})
    program = case.start_openmsistream("--collection_name", case.collection["name"],
                                       api_key=WRONG_KEY, root=False)
    code = program.wait(90)
    output = program.output()
    print(f"[omsi wrong key, collection] exit {code}; "
          f"{[line for line in output.splitlines() if 'ERROR' in line][:2]}")
    assert code != 0, output[-3000:]
    assert "failed to authenticate" in output or "Invalid API key" in output, output[-3000:]
    assert case.nothing_committed()


def test_openmsistream_with_a_wrong_key_and_a_root_folder_id_keeps_running(case: Case,
                                                                          girder_client):
    """With ``--girder_root_folder_id`` OpenMSIStream does not log in at start-up: it
    runs, and the first complete file's thread dies at its log-in (a traceback that
    quotes the key in the request's URL) and is restarted; nothing is uploaded."""
    case.produce({"waiting.txt": b"x"})
    program = case.start_openmsistream(api_key=WRONG_KEY)
    # Its supervisor logs the dead thread's exception and restarts the thread.
    wait_for(lambda: "Invalid API key" in program.output()
             and "will be restarted" in program.output(),
             "OpenMSIStream's log-in and the restart of the thread that died at it",
             program, timeout=90)
    alive = program.proc.poll() is None
    # Quit as a user would. It logs that it shut down once its threads' joins timed out
    # (10 s each), but the restarted thread is left running and the process does not
    # exit by itself: it is then stopped with a signal, not after a minute's wait.
    program.send_line("q")
    wait_for(lambda: "shut down" in program.output(), "OpenMSIStream's shut-down line",
             timeout=90)
    code = program.stop(timeout=5)
    output = program.output()
    print(f"[omsi wrong key, root id] alive after the file: {alive}; exit {code}; registry "
          f"rows {_omsi_rows(case)}; committed {case.committed()}")
    assert alive and "Traceback" in output and WRONG_KEY in output
    assert not girder_tree(girder_client, case.root["_id"]).items


def test_openmsistream_fails_files_girder_refuses_and_its_restart_retries_only_subfolders(
        case: Case, girder_client):
    """The restart case: a 400 to two files' upload fails them (left in its registry);
    a second run of the group, Girder healthy, rewinds to the start of the topic and
    uploads the one in a sub-folder, but never the one at the producer's root: the key
    filter of its re-read expects ``._victim.bin_chunk`` where the keys (1.8.8's own
    producer's too) are ``_victim.bin_chunk``."""
    files = {"victim.bin": bytes(range(256)) * 300, "sub/victim2.bin": b"\x05" * 70_000,
             "ok.txt": b"fine\n"}
    case.produce(files)
    faults = [case.proxy.fail("POST file", 400, name=name)
              for name in ("victim.bin", "victim2.bin")]
    root = case.root["_id"]
    case.run_openmsistream(
        lambda out: out.count("failed to upload the file") >= 2
        and complete_in_girder(girder_client, root, files) == {"ok.txt"},
        "ok.txt uploaded and the victims failed")
    rows = _omsi_rows(case)
    for fault in faults:
        fault.disarm()
    mark = len(case.proxy.seen)
    # The restart has had every chance at victim.bin once it read the whole topic again
    # and committed its end.
    output = case.run_openmsistream(
        lambda out: "sub/victim2.bin" in complete_in_girder(girder_client, root, files)
        and not case.behind(), "sub/victim2.bin uploaded by the restart, the topic read")
    landed = complete_in_girder(girder_client, root, files)
    asked = {s.name for s in case.proxy.seen[mark:] if s.route == "POST file"}
    print(f"[omsi restart] registry after the first run: {rows}; the restart uploaded "
          f"{sorted(landed - {'ok.txt'})}, asked Girder for {sorted(asked)}; "
          f"{[line for line in output.splitlines() if 'Consumers will start' in line]}")
    # Both left to the next run (``failed``, or ``in_progress`` after a rebalance between
    # its two consumers handed their uncommitted messages over again).
    assert set(rows) == {"victim.bin", "sub/victim2.bin"}
    assert landed == {"ok.txt", "sub/victim2.bin"} and asked == {"victim2.bin"}


def test_openmsistream_retries_5xx_and_403_quickly_then_gives_up(case: Case,
                                                                 girder_client):
    """Its HTTP session retries 5 times within seconds, on 403, 429 and 5xx alike: a
    short fault is ridden out, a lasting one fails the file, which stays out of Girder
    for the rest of the run although Girder answers again."""
    files = {"short.txt": b"short fault\n", "forbidden.txt": b"403 twice\n",
             "lasting.bin": bytes(range(256)) * 300}
    case.produce(files)
    case.proxy.fail("POST item", 503, times=2, name="short.txt")
    case.proxy.fail("POST item", 403, times=2, name="forbidden.txt")
    lasting = case.proxy.fail("POST file", 503, name="lasting.bin")
    root = case.root["_id"]
    program = case.start_openmsistream(out=case.tmp / "omsi_out")
    wait_for(lambda: "failed to upload the file" in program.output()
             and complete_in_girder(girder_client, root, files) == {"short.txt", "forbidden.txt"},
             "the short faults ridden out and the lasting one given up", program, timeout=120)
    lasting.disarm()
    # The run goes on and Girder answers: a file produced now lands, and the given-up
    # one is in the registry; it is still not retried.
    later = {"later.txt": b"after the fault\n"}
    case.produce(later)
    wait_for(lambda: complete_in_girder(girder_client, root, later) == {"later.txt"}
             and "lasting.bin" in _omsi_rows(case),
             "a later file in Girder and the given-up one in the registry", program,
             timeout=120)
    landed = complete_in_girder(girder_client, root, files)
    program.stop(timeout=60)
    print(f"[omsi 5xx] {lasting.hits} attempts at the lasting 503; in Girder once a later "
          f"file landed: {sorted(landed)}; registry {_omsi_rows(case)}")
    assert lasting.hits == 6 and "lasting.bin" not in landed
    # Its registry lists the file given up, but when it marks it "failed" depends on its
    # own save timing: both were seen.
    rows = _omsi_rows(case)
    assert set(rows) - {"later.txt"} == {"lasting.bin"}, rows
    assert rows["lasting.bin"] in ("failed", "in_progress"), rows
    assert rows.get("later.txt", "in_progress") == "in_progress", rows  # landed: not failed


def test_openmsistream_leaves_an_item_without_metadata_when_setting_it_fails(
        case: Case, girder_client):
    """A 400 to ``PUT item/:id/metadata`` after an upload: the item stays without its
    metadata (checksum, topic, version) and the file is failed; when it reads the file
    again (its restart, or a re-delivery in the same run) it finds the same bytes in
    Girder, skips it, and the item never gets its metadata."""
    files = {"test_folder/odd_failure.txt": b"Odd failure test"}  # as in its test
    case.produce(files)
    fault = case.proxy.fail("PUT item/:id/metadata", 400)
    root = case.root["_id"]
    first = case.run_openmsistream(lambda out: "failed to set metadata" in out,
                                   "the metadata failure")
    fault.disarm()
    # Its messages may come again in the same run (its second consumer joins the group
    # and gets them, uncommitted); else its restart reads them again.
    if "Skipping upload" not in first:
        case.run_openmsistream(lambda out: "Skipping upload" in out, "the restart's skip")
    meta = girder_tree(girder_client, root).items["test_folder/odd_failure.txt"].get("meta") \
        or {}
    print(f"[omsi metadata failure] item metadata after the restart: {meta}")
    assert "checksum" not in meta and "KafkaTopic" not in meta
