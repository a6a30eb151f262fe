"""OpenMSIStream's own test cases of its GirderUploadStreamProcessor, re-created as
integration tests of ours: what lands in Girder, the command line and the start-up.

OpenMSIStream tests these cases by calling its processor's upload method directly on
hand-made file objects, with ``responses`` mocking some Girder answers. Here every case
goes end to end instead: chunk messages on a real Kafka topic, our real CLI as a
subprocess, the real Girder behind a fault-injecting proxy
(:mod:`tests.integration.girder_faults`). The failure cases of the upload steps and the
restart are in ``test_openmsistream_faults.py``; what OpenMSIStream 1.8.8 itself does in
the same situations is in ``test_openmsistream_facts.py``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cases_support import (MAX_IDLE, Case, Finished, case,  # noqa: F401
                                             produce_files)
from tests.integration import stack_share
from tests.integration.girder_faults import FaultProxy
from tests.integration.girder_checks import download_item, folder_by_path, girder_tree
from tests.integration.kafka_checks import committed_offsets, end_offsets
from tests.integration.local_files import CHUNK_SIZE, n_chunks, processed_rel_paths, sha256
from tests.integration.programs import (OUR_PROCESSOR, Program, consumer_argv, consumer_env,
                                        finish, produce_omsi_file, stop_line, write_fault_config,
                                        write_omsi_config)

pytestmark = pytest.mark.integration

METADATA = {"somekey": "somevalue"}
LANDED_FILES = {
    "test_file.txt": b"Test file content",
    "level1/level2/level3/nested.txt": b"Nested file content",
    "test_image.png": b"Fake PNG content",
    "table.csv": b"a;b\n1;2\n",
    "blob.qqqz": b"\x00\x01 no known type",
    "big/multi.bin": bytes(range(256)) * (3 * CHUNK_SIZE // 256) + b"tail",
}
WRONG_KEY = "wrongkey" + "0" * 32


# ------------------------------------------------------------------ one run, many checks

#: The tests that read ``landed`` run on one worker of a parallel run, so that its two
#: consumer runs happen once, not once per worker.
LANDED = pytest.mark.xdist_group("openmsistream-cases-landed")

def _land(stack_env, kafka_admin, girder_client, topic: str, group: str, root: dict,
          mode: str, tmp: Path) -> dict:
    """Produce ``LANDED_FILES``, run our CLI once through the fault proxy, and collect
    what every test of the module reads."""
    produce_files(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic, LANDED_FILES)
    with FaultProxy(stack_env["GIRDER_API_URL"]) as proxy:
        proxy.fail("PUT item/:id/metadata", 400)
        proxy.fail("PUT folder/:id/metadata", 400)
        argv = consumer_argv(proxy.url, topic, "unused", tmp / "out", group,
                             write_fault_config(tmp / "consumer.config"), MAX_IDLE,
                             "--girder_root_folder_id", root["_id"], "--mode", mode,
                             "--metadata", json.dumps(METADATA))
        program = Program(argv, tmp / "run.out", cwd=tmp,
                          env=consumer_env(stack_env, {}))  # no Prefect API
        code = program.wait(240)
    log = tmp / "out" / "LOGS" / "GirderUploadStreamProcessor.log"
    return {"code": code, "output": program.output(), "log": log, "topic": topic,
            "group": group, "root": root, "proxy": proxy, "out": tmp / "out",
            "tree": girder_tree(girder_client, root["_id"]), "program": program,
            "committed": committed_offsets(kafka_admin, group, topic),
            "end": end_offsets(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic)}


@pytest.fixture(scope="module", params=["memory", "disk"])
def landed(request, tmp_path_factory, stack_env, kafka_admin,
           girder_client) -> Iterator[dict]:
    """One run of our CLI (``--mode`` memory, then disk) over ``LANDED_FILES``, below a
    fresh root folder, with ``--metadata``; the proxy answers 400 to every separate
    metadata request (OpenMSIStream sends one per item and folder; ours should not)."""
    from confluent_kafka.admin import NewTopic
    mode, tag = request.param, uuid.uuid4().hex[:8]
    topic, group = f"t-cases-landed-{mode}-{tag}", f"g-cases-landed-{mode}-{tag}"
    tmp = tmp_path_factory.mktemp(f"landed-{mode}")
    # Module-scoped, so set up before (and torn down after) any test's own share.
    with stack_share.shared():
        kafka_admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)]
                                  )[topic].result(timeout=60)
        collection = girder_client.createCollection(f"c-cases-landed-{mode}-{tag}",
                                                    public=False)
        try:
            root = girder_client.createFolder(collection["_id"], "root",
                                              parentType="collection")
            landed = _land(stack_env, kafka_admin, girder_client, topic, group, root, mode, tmp)
        except BaseException:
            _remove(girder_client, kafka_admin, collection, topic)
            raise
    yield landed
    with stack_share.shared():
        _remove(girder_client, kafka_admin, collection, topic)


def _remove(girder_client, kafka_admin, collection: dict, topic: str) -> None:
    girder_client.delete(f"collection/{collection['_id']}")
    kafka_admin.delete_topics([topic], operation_timeout=30)


def _item(landed: dict, rel: str) -> dict:
    assert landed["code"] == 0, landed["program"].describe((landed["log"],))
    items = landed["tree"].items
    assert rel in items, f"{rel} not in Girder; there: {sorted(items)}\n" \
                         f"{landed['program'].describe((landed['log'],))}"
    return items[rel]


def _girder_file(girder_client, item: dict) -> dict:
    files = list(girder_client.listFile(item["_id"]))
    assert len(files) == 1, f"{item['name']}: {len(files)} files in its item"
    return files[0]


@LANDED
def test_a_simple_file_lands_with_its_bytes(landed, girder_client):
    """OpenMSIStream: test_girder_upload_simple_file (memory and disk datafiles)."""
    for rel in ("test_file.txt", "big/multi.bin"):
        item = _item(landed, rel)
        assert download_item(girder_client, item) == LANDED_FILES[rel], rel
        stored = _girder_file(girder_client, item)
        assert stored["sha512"] == hashlib.sha512(LANDED_FILES[rel]).hexdigest(), rel


@LANDED
def test_subfolders_mirror_the_producer_tree(landed, girder_client):
    """OpenMSIStream: test_girder_upload_with_subdirectories."""
    item = _item(landed, "level1/level2/level3/nested.txt")
    path = girder_client.get(f"resource/{item['_id']}/path", parameters={"type": "item"})
    assert path.endswith("/root/level1/level2/level3/nested.txt"), path
    assert download_item(girder_client, item) == b"Nested file content"
    for folder in ("level1", "level1/level2", "level1/level2/level3", "big"):
        assert folder in landed["tree"].folders, sorted(landed["tree"].folders)


@LANDED
def test_mimetype_is_guessed_from_the_name(landed, girder_client):
    """OpenMSIStream: test_girder_upload_mimetype (``.png`` -> ``image/png``), plus a
    known text type and an unknown suffix (OpenMSIStream's fallback)."""
    expected = {"test_image.png": "image/png", "table.csv": "text/csv",
                "blob.qqqz": "application/octet-stream"}
    got = {rel: _girder_file(girder_client, _item(landed, rel)).get("mimeType")
           for rel in expected}
    assert got == expected


@LANDED
def test_metadata_on_every_item_and_folder(landed):
    """OpenMSIStream: the ``--metadata`` part of test_girder_upload_stream_processor_kafka,
    and the metadata of the folders it creates."""
    for rel, data in LANDED_FILES.items():
        meta = _item(landed, rel).get("meta") or {}
        assert meta.get("somekey") == "somevalue", (rel, meta)
        assert meta.get("KafkaTopic") == landed["topic"], (rel, meta)
        assert meta.get("checksum") == {"sha256": sha256(data)}, (rel, meta)
        assert "OpenMSIStreamVersion" in meta, (rel, meta)
    for rel, folder in landed["tree"].folders.items():
        meta = folder.get("meta") or {}
        assert meta.get("somekey") == "somevalue" and meta.get("KafkaTopic") == landed[
            "topic"] and "checksum" not in meta, (rel, meta)


@LANDED
def test_metadata_travels_with_the_item_not_in_a_later_request(landed):
    """Differs on purpose: OpenMSIStream sets an item's metadata in a request after the
    upload, so a failure there leaves an item without metadata. Ours sends it with the
    item (and folder) it creates: the proxy refused every separate metadata request of
    this run, none was sent, and every item has its metadata (test above)."""
    _item(landed, "test_file.txt")
    proxy: FaultProxy = landed["proxy"]
    assert proxy.count("PUT item/:id/metadata") == 0, proxy.routes()
    assert proxy.count("PUT folder/:id/metadata") == 0, proxy.routes()


@LANDED
def test_the_run_reports_and_registers_what_it_did(landed):
    """OpenMSIStream: test_run_from_command_line and ..._with_output_dir (never collected
    there: they are nested in another test). The run's summary line counts the messages
    and files, the registry and log file are below ``--output_dir``, and the group
    committed to the end of the topic."""
    _item(landed, "test_file.txt")
    summary = stop_line(landed["output"])
    assert summary["messages"] == sum(n_chunks(d) for d in LANDED_FILES.values()), summary
    assert (summary["uploaded"], summary["failed"]) == (len(LANDED_FILES), 0), summary
    assert sorted(processed_rel_paths(landed["out"] / "LOGS", landed["topic"],
                                      landed["group"])) == sorted(LANDED_FILES)
    assert landed["log"].is_file()
    assert landed["committed"] == landed["end"], (landed["committed"], landed["end"])


# ------------------------------------------------------------------ single-run cases

def test_openmsistream_producer_to_the_drop_in_default_layout(case: Case, girder_client):
    """OpenMSIStream: test_girder_upload_stream_processor_kafka. The real OpenMSIStream
    producer (``UploadDataFile``), our ``GirderUploadStreamProcessor`` command with a
    collection name and ``--metadata``: the file is at ``/collection/C/C/TOPIC/name``
    (OpenMSIStream 1.8.8's layout), its metadata and sha512 right."""
    data = bytes(range(251)) * 900
    source = case.tmp / "src" / "omsi_produced.dat"
    source.parent.mkdir()
    source.write_bytes(data)
    finish(produce_omsi_file(source, case.topic,
                             write_omsi_config(case.tmp / "omsi.config", case.bootstrap),
                             case.tmp), "OpenMSIStream UploadDataFile")
    name = case.collection["name"]
    argv = [str(OUR_PROCESSOR), case.proxy.url, "--config", str(case.config),
            "--topic_name", case.topic, "--consumer_group_id", case.group,
            "--collection_name", name, "--output_dir", str(case.out),
            "--metadata", json.dumps(METADATA), "--max_idle_seconds", str(MAX_IDLE)]
    run = case.finish(case.start(argv))
    assert run.code == 0, run.program.describe()
    folder = folder_by_path(girder_client, f"/collection/{name}/{name}/{case.topic}")
    item = next(girder_client.listItem(folder["_id"], name="omsi_produced.dat"), None)
    assert item is not None, run.program.describe()
    assert item["meta"]["somekey"] == "somevalue", item["meta"]
    stored = _girder_file(girder_client, item)
    assert stored["sha512"] == hashlib.sha512(data).hexdigest()


def test_a_run_with_nothing_to_consume_reports_zero(case: Case):
    """OpenMSIStream: test_run_from_command_line_no_files (never collected there)."""
    run = case.run()
    assert run.code == 0, run.program.describe()
    summary = run.summary()
    assert (summary["messages"], summary["uploaded"], summary["failed"]) == (0, 0, 0), summary
    assert case.proxy.count("POST item") == case.proxy.count("POST file") == 0


@pytest.mark.parametrize("metadata", ["this is not valid JSON", "[1, 2]", '"a string"'])
def test_invalid_metadata_is_a_usage_error_before_anything_is_consumed(case: Case, metadata):
    """OpenMSIStream: test_girder_invalid_metadata_json (it raises a JSONDecodeError from
    its constructor). Ours: a usage error (exit 2) naming the option, before Kafka or
    Girder is contacted; a JSON value that is not an object is refused too."""
    case.produce({"waiting.txt": b"must stay unconsumed"})
    run = case.run("--metadata", metadata)
    assert run.code == 2, run.program.describe()
    assert "--metadata" in run.output and "Traceback" not in run.output, run.output
    assert case.proxy.count() == 0, case.proxy.routes()
    assert case.nothing_committed(), case.committed()
    assert not case.logs.exists() or not list(case.logs.glob("*.csv"))


def _assert_stopped_at_startup(case: Case, run: Finished, secret: str | None = None) -> None:
    """Non-zero exit with one clear ``error:`` line, no traceback, no secret, and
    nothing consumed, registered or committed."""
    described = run.program.describe((case.logs / "GirderUploadStreamProcessor.log",))
    assert run.code != 0, described
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot start" in errors[0], described
    assert "Traceback" not in run.output, described
    if secret:
        assert secret not in run.text, "the API key appears in the output or log"
    assert case.proxy.count("POST item") == case.proxy.count("POST file") == 0, \
        case.proxy.routes()
    assert case.nothing_committed(), case.committed()
    assert not case.failed_rows() and not case.processed()


@pytest.mark.parametrize("root", [True, False], ids=["root_folder_id", "collection"])
def test_a_wrong_api_key_stops_the_program_at_startup(case: Case, root, girder_client):
    """OpenMSIStream: test_girder_authentication_failure. Girder 5 answers a wrong key
    with HTTP 400. Ours stops at start-up with one clear line and a non-zero exit,
    having consumed, registered and committed nothing (differs on purpose with a root
    folder id, which OpenMSIStream only uses at the first file: see the facts)."""
    case.produce({"kept.txt": b"for the run with the right key"})
    run = case.run(root=root, api_key=WRONG_KEY, timeout=120)
    _assert_stopped_at_startup(case, run, WRONG_KEY)
    assert "API key" in run.output, run.output


def test_girder_answering_401_at_log_in_stops_the_program_at_startup(case: Case):
    """OpenMSIStream: test_girder_authentication_failure mocks exactly this answer (401
    to ``POST api_key/token``); here the real key is sent and the proxy refuses it."""
    case.produce({"kept.txt": b"x"})
    case.proxy.fail("POST api_key/token", 401)
    run = case.run(timeout=120)
    _assert_stopped_at_startup(case, run, case.stack_env["GIRDER_API_KEY"])


@pytest.mark.parametrize("route,root", [("POST folder", False), ("GET folder/:id", True),
                                        ("POST collection", False)],
                         ids=["create_root_path_folder", "get_root_folder_id",
                              "create_collection"])
def test_a_4xx_resolving_the_root_folder_stops_the_program_at_startup(case: Case, route,
                                                                      root):
    """OpenMSIStream: the root-folder part of test_girder_odd_failures. A root folder
    that cannot be resolved is not any file's failure: the program stops at start-up."""
    case.produce({"kept.txt": b"x"})
    case.proxy.fail(route, 400 if route != "POST collection" else 403)
    name = f"{case.collection['name']}-new" if route == "POST collection" else \
        case.collection["name"]
    run = case.run(root=root, collection=name, timeout=120)
    _assert_stopped_at_startup(case, run)
    assert case.proxy.count(route, injected=True) >= 1, case.proxy.routes()


def test_a_startup_stop_loses_nothing_for_the_next_run(case: Case, girder_client):
    """After a start-up stop (wrong key), a run of the same group with the right key
    uploads the file: the stop consumed and committed nothing."""
    case.produce({"kept.txt": b"for the run with the right key"})
    _assert_stopped_at_startup(case, case.run(api_key=WRONG_KEY, timeout=120), WRONG_KEY)
    run = case.run()
    assert run.code == 0 and run.summary()["uploaded"] == 1, run.program.describe()
    items = girder_tree(girder_client, case.root["_id"]).items
    assert download_item(girder_client, items["kept.txt"]) == b"for the run with the right key"
    assert not case.behind(), case.behind()

