"""KafkaCrypto-encrypted topics on the real stack (issue 16, part 3).

Every test provisions its nodes offline in its temporary folder, with kafkacrypto's
password-based provisioning (tests/integration/kafkacrypto_nodes.py): a producer node
and a consumer node that share a root of trust, or a consumer whose root of trust is
another one. Each test creates its data topic and the three key-exchange topics, as
whoever creates an encrypted topic must (the broker creates none by itself).

The consumer is always our real ``GirderUploadStreamProcessor`` command; producers are
OpenMSIStream 1.8.8's ``DataFileUploadDirectory`` (from .venv-openmsistream) and our
``girder-upload-stream produce``.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.girder_checks import assert_uploaded, girder_tree
from tests.integration.kafka_checks import committed_offsets, end_offsets, topic_messages
from tests.integration.local_files import CHUNK_SIZE, n_chunks, processed_rel_paths, write_tree
from tests.integration.programs import (OMSI_BIN, OUR_CLI, OUR_PROCESSOR, Program, consumer_env, wait_for, write_omsi_config)
from tests.integration.kafkacrypto_nodes import provision_node, write_node_config

pytestmark = pytest.mark.integration

ROOT_OF_TRUST = "gus-test-root-of-trust"
OTHER_ROOT_OF_TRUST = "another-lab-root-of-trust"
PROVISIONER = "gus-test-provisioner"
SECRET = b"TOP SECRET instrument reading 0xC0FFEE "
RUN_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def encrypted_topic(make_topic):
    """Factory: a fresh data topic plus its ``.keys``, ``.reqs`` and ``.subs`` topics
    (one partition each: kafkacrypto reads partition 0 only)."""
    from girder_upload_stream.kafka.crypto import key_exchange_topics

    def factory(partitions: int = 4) -> str:
        topic = make_topic(partitions=partitions)
        for name in key_exchange_topics(topic):
            make_topic(partitions=1, name=name)
        return topic

    return factory


def provision(folder: Path, bootstrap: str, topic: str, consumer_root: str = ROOT_OF_TRUST
              ) -> dict[str, Path]:
    """A producer node (found by ``node_id`` next to its config file) and a consumer
    node (named by ``config_file``); returns both OpenMSIStream config files."""
    provision_node(folder, "lab_producer", "producer", [topic], rot_password=ROOT_OF_TRUST,
                   provisioner_password=PROVISIONER)
    store = provision_node(folder, "gus_consumer", "consumer", [topic],
                           rot_password=consumer_root, provisioner_password=PROVISIONER)
    return {"producer": write_node_config(folder / "producer.config", bootstrap,
                                          node_id="lab_producer"),
            "consumer": write_node_config(folder / "consumer.config", bootstrap,
                                          config_file=store)}


def lab_files(seed: int, big: int = 0) -> dict[str, bytes]:
    """Random files (so that any 64 bytes of them are unique) with a recognisable text,
    in sub-folders; ``big`` adds one file of that many bytes."""
    rng = random.Random(seed)
    files = {
        "reading.txt": SECRET * 40,
        "run1/spectrum.bin": rng.randbytes(3 * CHUNK_SIZE + 17),
        "run1/sample A/raw.dat": rng.randbytes(1000),
        "run2/ü/notes.json": b'{"secret": "' + SECRET + b'"}',
    }
    if big:
        files["run3/big.raw"] = rng.randbytes(big)
    return files


def root_folder(girder_client, make_collection) -> dict:
    """A fresh Girder folder to upload below (``--girder_root_folder_id``)."""
    collection = make_collection()
    return girder_client.createFolder(collection["_id"], "encrypted", parentType="collection")


def processor_argv(api_url: str, config: Path, topic: str, folder: dict, out: Path,
                   group: str, *extra: str) -> list[str]:
    return [str(OUR_PROCESSOR), api_url, "--config", str(config), "--topic_name", topic,
            "--girder_root_folder_id", folder["_id"], "--consumer_group_id", group,
            "--output_dir", str(out), "--update_seconds", "5", *extra]


def files_in_girder(gc, folder_id: str, files: dict[str, bytes]):
    def check() -> bool:
        items = girder_tree(gc, folder_id).items
        return all(rel in items and items[rel].get("size") == len(data)
                   for rel, data in files.items())
    return check


def wait_assigned(admin, group: str, timeout: float = 60.0) -> None:
    """Until the consumer group has a member with partitions (the consumer is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
        if any(m.assignment.topic_partitions for m in described.members):
            return
        time.sleep(0.2)
    pytest.fail(f"consumer group {group} got no partitions within {timeout:.0f}s")


def omsi_uploader(tree: Path, config: Path, topic: str, log: Path, cwd: Path,
                  chunk_size: int = CHUNK_SIZE) -> Program:
    """OpenMSIStream's DataFileUploadDirectory: uploads what is in ``tree`` and keeps
    running (and answering key requests) until it is stopped."""
    return Program([str(OMSI_BIN / "DataFileUploadDirectory"), str(tree), "--config",
                    str(config), "--topic_name", topic, "--chunk_size", str(chunk_size),
                    "--upload_existing", "--watchdog_lag_time", "1", "--update_seconds", "-1"],
                   log, cwd=cwd)


def our_producer(tree: Path, config: Path, topic: str, log: Path, cwd: Path,
                 serve_keys: float, env: dict[str, str]) -> Program:
    """Our ``produce``, answering key requests for ``serve_keys`` seconds at the end."""
    return Program([str(OUR_CLI), "produce", str(tree), "--config", str(config),
                    "--topic_name", topic, "--chunk_size", str(CHUNK_SIZE),
                    "--serve_keys_seconds", f"{serve_keys:g}"],
                   log, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def stop_producer(producer: Program, interrupt: bool = True) -> str:
    """Check that our producer exits 0; with ``interrupt``, end its key-serving wait
    early (SIGINT, as Ctrl-C would) once it is there."""
    if interrupt:
        wait_for(lambda: "answering key requests" in producer.output() or
                 producer.proc.poll() is not None, "our producer serving keys", timeout=120)
        if producer.proc.poll() is None:
            producer.proc.send_signal(signal.SIGINT)
    code = producer.wait(60)
    assert code == 0, f"our produce failed ({code}):\n{producer.describe()}"
    return producer.output()


def all_committed(admin, bootstrap: str, group: str, topic: str) -> None:
    """Every partition that holds messages is committed to its end."""
    committed = committed_offsets(admin, group, topic)
    ends = {p: end for p, end in end_offsets(bootstrap, topic).items() if end > 0}
    assert {p: committed.get(p) for p in ends} == ends, (committed, ends)


def in_progress_rows(logs: Path, topic: str, group: str) -> list:
    from girder_upload_stream.registry.tables import InProgressTable
    return InProgressTable.open(logs, topic, group).rows()


# -------------------------------------------------------------------------------- tests

@pytest.mark.timeout(300)
def test_openmsistream_encrypted_producer_to_girder(tmp_path, stack_env, prefect_env,
                                                    encrypted_topic, make_group,
                                                    make_collection, girder_client,
                                                    kafka_admin, programs):
    """(a) OpenMSIStream's own producer with KafkaCrypto -> our consumer -> Girder holds
    the right bytes, and every offset is committed."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = encrypted_topic(partitions=4)
    configs = provision(tmp_path / "nodes", bootstrap, topic)
    folder = root_folder(girder_client, make_collection)
    files = write_tree(tmp_path / "tree", lab_files(seed=1))
    out, group = tmp_path / "out", make_group()
    consumer = Program(processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"], topic,
                                      folder, out, group),
                       tmp_path / "consumer.out", cwd=tmp_path,
                       env=consumer_env(stack_env, prefect_env))
    programs.append(consumer)
    uploader = omsi_uploader(tmp_path / "tree", configs["producer"], topic,
                             tmp_path / "uploader.out", tmp_path)
    programs.append(uploader)
    logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    wait_for(files_in_girder(girder_client, folder["_id"], files), "the files in Girder",
             consumer, logs, timeout=RUN_TIMEOUT)
    assert uploader.stop() == 0, uploader.describe()
    consumer.send_line("q")
    assert consumer.wait(60) == 0, consumer.describe(logs)
    assert_uploaded(girder_client, folder["_id"], files, topic)
    assert sorted(processed_rel_paths(out / "LOGS", topic, group)) == sorted(files)
    all_committed(kafka_admin, bootstrap, group, topic)
    assert "could not be decrypted" not in consumer.output(), consumer.describe(logs)


@pytest.mark.timeout(300)
def test_plain_consumer_never_sees_the_bytes(tmp_path, stack_env, prefect_env, make_topic,
                                             make_group, make_collection, girder_client,
                                             kafka_admin, programs):
    """(b) Our ``produce`` on an encrypted topic creates its key-exchange topics; a plain
    Kafka consumer of the topic reads neither the files' bytes nor their names, while
    our consumer (a node of the same root of trust), started once everything is
    produced, gets the keys from the producer and rebuilds the files exactly."""
    from girder_upload_stream.wire.codec import decode_chunk
    from girder_upload_stream.errors import ChunkDecodeError
    from girder_upload_stream.kafka.crypto import key_exchange_topics
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = make_topic(partitions=3)
    configs = provision(tmp_path / "nodes", bootstrap, topic)
    folder = root_folder(girder_client, make_collection)
    files = write_tree(tmp_path / "tree", lab_files(seed=2))
    env = consumer_env(stack_env, prefect_env)
    out, group = tmp_path / "out", make_group()
    logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    producer = our_producer(tmp_path / "tree", configs["producer"], topic,
                            tmp_path / "producer.out", tmp_path, 120, env)
    programs.append(producer)
    try:
        wait_for(lambda: "answering key requests" in producer.output(),
                 "every chunk acknowledged", producer)
        topics = kafka_admin.list_topics(timeout=10).topics
        for name in key_exchange_topics(topic):
            assert name in topics and len(topics[name].partitions) == 1, (name, topics.get(name))
        consumer = Program(processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"],
                                          topic, folder, out, group),
                           tmp_path / "consumer.out", cwd=tmp_path, env=env)
        programs.append(consumer)
        wait_for(files_in_girder(girder_client, folder["_id"], files), "the files in Girder",
                 consumer, logs, timeout=RUN_TIMEOUT)
        consumer.send_line("q")
        assert consumer.wait(60) == 0, consumer.describe(logs)
        produced = stop_producer(producer)
    finally:
        for future in kafka_admin.delete_topics(key_exchange_topics(topic)).values():
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass
    assert "created the KafkaCrypto key-exchange topics" in produced, produced
    assert "do not exist" not in consumer.output(), consumer.describe(logs)
    assert_uploaded(girder_client, folder["_id"], files, topic)

    n_messages = sum(n_chunks(data) for data in files.values())
    raw = topic_messages(bootstrap, topic, make_group(), n_messages)
    assert len(raw) == n_messages
    samples = [data[i:i + 64] for data in files.values() for i in range(0, len(data), 997)
               if len(data[i:i + 64]) == 64]
    names = [Path(rel).name.encode() for rel in files] + [b"_chunk_", b"run1"]
    for msg in raw:
        key, value = msg.key() or b"", msg.value() or b""
        assert SECRET not in value and SECRET not in key
        leaked = [s for s in samples if s in value] + [n for n in names if n in key + value]
        assert not leaked, f"message {msg.partition()}@{msg.offset()} shows plaintext"
        with pytest.raises(ChunkDecodeError):
            decode_chunk(value, key)


@pytest.mark.timeout(300)
def test_other_root_of_trust_uploads_and_commits_nothing(tmp_path, stack_env, prefect_env,
                                                         encrypted_topic, make_group,
                                                         make_collection, girder_client,
                                                         kafka_admin, programs):
    """(c) A consumer node provisioned with another root of trust never gets a key: it
    uploads nothing, commits nothing, registers every message with its reason and
    says so in its log and in its last line."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = encrypted_topic(partitions=2)
    configs = provision(tmp_path / "nodes", bootstrap, topic, consumer_root=OTHER_ROOT_OF_TRUST)
    folder = root_folder(girder_client, make_collection)
    files = write_tree(tmp_path / "tree", lab_files(seed=3))
    n_messages = sum(n_chunks(data) for data in files.values())
    env = consumer_env(stack_env, prefect_env)
    producer = our_producer(tmp_path / "tree", configs["producer"], topic,
                            tmp_path / "producer.out", tmp_path, 120, env)
    programs.append(producer)
    out, group = tmp_path / "out", make_group()
    try:
        wait_for(lambda: sum(end_offsets(bootstrap, topic).values()) >= n_messages,
                 "the encrypted chunks on the topic")
        consumer = Program(processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"],
                                          topic, folder, out, group,
                                          "--max_initial_wait_per_decrypt", "8",
                                          "--max_wait_per_decrypt", "2",
                                          "--max_idle_seconds", "4"),
                           tmp_path / "consumer.out", cwd=tmp_path, env=env,
                           stdin=subprocess.DEVNULL)
        programs.append(consumer)
        logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
        assert consumer.wait(RUN_TIMEOUT) == 0, consumer.describe(logs)
    finally:
        stop_producer(producer)
    output = consumer.output()
    assert f"{n_messages} message(s) could not be decrypted and were left uncommitted" \
        in output, consumer.describe(logs)
    assert "provisioned with the producers' root of trust" in output, consumer.describe(logs)
    assert "0 files uploaded" in output, consumer.describe(logs)
    assert girder_tree(girder_client, folder["_id"]).items == {}
    committed = committed_offsets(kafka_admin, group, topic)
    assert all(offset < 0 for offset in committed.values()), committed
    rows = [r for r in in_progress_rows(out / "LOGS", topic, group)
            if str(r.extra.get("reason", "")).startswith("not decrypted")]
    assert len(rows) == n_messages, [r.extra for r in in_progress_rows(out / "LOGS", topic, group)]
    assert all(r.status == "failed" for r in rows)
    assert processed_rel_paths(out / "LOGS", topic, group) == []


@pytest.mark.timeout(360)
def test_given_up_messages_are_read_again_after_a_restart(tmp_path, stack_env, prefect_env,
                                                          encrypted_topic, make_group,
                                                          make_collection, girder_client,
                                                          kafka_admin, programs):
    """Messages whose key did not come (no producer was running) are given up, left
    uncommitted and registered; the next run of the group, once a producer of the node
    runs again (with a new key index: its earlier keys come from its store), reads them
    again, decrypts and uploads them, and their registry rows go."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = encrypted_topic(partitions=2)
    configs = provision(tmp_path / "nodes", bootstrap, topic)
    folder = root_folder(girder_client, make_collection)
    first = write_tree(tmp_path / "first", {"early/a.bin": random.Random(4).randbytes(150_000)})
    second = write_tree(tmp_path / "second", {"late/b.txt": SECRET * 3})
    env = consumer_env(stack_env, prefect_env)
    stop_producer(our_producer(tmp_path / "first", configs["producer"], topic,
                               tmp_path / "producer1.out", tmp_path, 0, env), interrupt=False)
    out, group = tmp_path / "out", make_group()
    logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    run = processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"], topic, folder, out,
                         group, "--max_initial_wait_per_decrypt", "4", "--max_idle_seconds", "3")
    first_run = Program(run, tmp_path / "run1.out", cwd=tmp_path, env=env,
                        stdin=subprocess.DEVNULL)
    programs.append(first_run)
    assert first_run.wait(RUN_TIMEOUT) == 0, first_run.describe(logs)
    n_first = n_chunks(first["early/a.bin"])
    assert f"{n_first} message(s) could not be decrypted" in first_run.output(), \
        first_run.describe(logs)
    assert all(o < 0 for o in committed_offsets(kafka_admin, group, topic).values())
    assert len(in_progress_rows(out / "LOGS", topic, group)) == n_first

    producer = our_producer(tmp_path / "second", configs["producer"], topic,
                            tmp_path / "producer2.out", tmp_path, 120, env)
    programs.append(producer)
    try:
        second_run = Program(run[:-4], tmp_path / "run2.out", cwd=tmp_path, env=env)
        programs.append(second_run)
        both = {**first, **second}
        wait_for(files_in_girder(girder_client, folder["_id"], both), "both files in Girder",
                 second_run, logs, timeout=RUN_TIMEOUT)
        second_run.send_line("q")
        assert second_run.wait(60) == 0, second_run.describe(logs)
    finally:
        stop_producer(producer)
    assert_uploaded(girder_client, folder["_id"], both, topic)
    assert in_progress_rows(out / "LOGS", topic, group) == []
    all_committed(kafka_admin, bootstrap, group, topic)


@pytest.mark.timeout(300)
def test_plaintext_messages_in_an_encrypted_topic(tmp_path, stack_env, prefect_env,
                                                  encrypted_topic, make_group,
                                                  make_collection, girder_client,
                                                  kafka_admin, programs):
    """Messages that are not KafkaCrypto messages at all never become decryptable: they
    are registered with the reason and left uncommitted, so that the same group run
    with ``--treat_undecryptable_as_plaintext`` reads them as the plaintext chunks they
    are, uploads them and clears their rows."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = encrypted_topic(partitions=2)
    configs = provision(tmp_path / "nodes", bootstrap, topic)
    files = write_tree(tmp_path / "tree", lab_files(seed=5))
    plain = write_omsi_config(tmp_path / "plain.config", bootstrap)
    env = consumer_env(stack_env, prefect_env)
    done = subprocess.run([str(OUR_CLI), "produce", str(tmp_path / "tree"), "--config",
                           str(plain), "--topic_name", topic, "--chunk_size", str(CHUNK_SIZE)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    n_messages = sum(n_chunks(data) for data in files.values())
    folder = root_folder(girder_client, make_collection)
    out, group = tmp_path / "out", make_group()
    logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    for flag in ([], ["--treat_undecryptable_as_plaintext"]):
        consumer = Program(processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"],
                                          topic, folder, out, group, "--max_idle_seconds", "3",
                                          *flag),
                           tmp_path / f"consumer{len(flag)}.out", cwd=tmp_path, env=env,
                           stdin=subprocess.DEVNULL)
        programs.append(consumer)
        assert consumer.wait(RUN_TIMEOUT) == 0, consumer.describe(logs)
        rows = in_progress_rows(out / "LOGS", topic, group)
        if not flag:
            assert f"{n_messages} message(s) could not be decrypted and were left " \
                   f"uncommitted" in consumer.output(), consumer.describe(logs)
            assert "--treat_undecryptable_as_plaintext" in consumer.output()
            assert girder_tree(girder_client, folder["_id"]).items == {}
            reasons = [str(r.extra.get("reason", "")) for r in rows]
            assert len(rows) == n_messages, reasons
            assert all(r.startswith("not a KafkaCrypto message") for r in reasons), reasons
            assert all(o < 0 for o in committed_offsets(kafka_admin, group, topic).values())
        else:
            assert_uploaded(girder_client, folder["_id"], files, topic)
            assert rows == [], [r.extra for r in rows]
            all_committed(kafka_admin, bootstrap, group, topic)


@pytest.mark.timeout(420)
def test_encrypted_round_trip_time(tmp_path, stack_env, prefect_env, encrypted_topic,
                                   make_topic, make_group, make_collection, girder_client,
                                   kafka_admin, programs):
    """An encrypted round trip against a plaintext one (printed; run with ``-s``):
    OpenMSIStream's DataFileUploadDirectory -> our consumer -> Girder, three small files
    and one of 10 MiB, OpenMSIStream's default 512 KiB chunks, with the consumer already
    in its group. *first*: from the producer's start to the last file in Girder (for
    the encrypted topic this includes the key exchange); *again*: the same files copied
    into the watched folder while both programs run (keys known), from the copy to the
    last file in Girder."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    rng = random.Random(6)
    files = {"small/a.txt": SECRET * 100, "small/b.bin": rng.randbytes(20_000),
             "small/c.bin": rng.randbytes(70_000), "big/ten.raw": rng.randbytes(10 << 20)}
    again = {f"again/{rel}": data for rel, data in files.items()}
    env = consumer_env(stack_env, prefect_env)
    timings: dict[str, dict[str, float]] = {}
    for mode in ("plaintext", "encrypted"):
        topic = encrypted_topic(partitions=4) if mode == "encrypted" else make_topic(4)
        folder_path = tmp_path / mode
        folder_path.mkdir()
        configs = (provision(folder_path / "nodes", bootstrap, topic) if mode == "encrypted"
                   else dict.fromkeys(("producer", "consumer"), write_omsi_config(
                       tmp_path / "plain.config", bootstrap)))
        folder = root_folder(girder_client, make_collection)
        out, group = folder_path / "out", make_group()
        consumer = Program(processor_argv(stack_env["GIRDER_API_URL"], configs["consumer"],
                                          topic, folder, out, group),
                           folder_path / "consumer.out", cwd=tmp_path, env=env)
        programs.append(consumer)
        wait_assigned(kafka_admin, group)
        write_tree(folder_path / "tree", files)
        logs = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
        started = time.monotonic()
        uploader = omsi_uploader(folder_path / "tree", configs["producer"], topic,
                                 folder_path / "uploader.out", tmp_path, chunk_size=524_288)
        programs.append(uploader)
        wait_for(files_in_girder(girder_client, folder["_id"], files), "the files in Girder",
                 consumer, logs, timeout=RUN_TIMEOUT)
        timings[mode] = {"first": time.monotonic() - started}
        started = time.monotonic()
        write_tree(folder_path / "tree", again)
        wait_for(files_in_girder(girder_client, folder["_id"], again), "the copies in Girder",
                 consumer, logs, timeout=RUN_TIMEOUT)
        timings[mode]["again"] = time.monotonic() - started
        assert uploader.stop() == 0, uploader.describe()
        consumer.send_line("q")
        assert consumer.wait(60) == 0, consumer.describe(logs)
        assert_uploaded(girder_client, folder["_id"], {**files, **again}, topic)
    plain, encrypted = timings["plaintext"], timings["encrypted"]
    print(f"\nround trip, {len(files)} files ({sum(map(len, files.values())):,} bytes), "
          f"OpenMSIStream producer -> our consumer -> Girder: first: plaintext "
          f"{plain['first']:.1f}s, encrypted {encrypted['first']:.1f}s; again (keys known): "
          f"plaintext {plain['again']:.1f}s, encrypted {encrypted['again']:.1f}s")
