"""Outages mid-stream: the Girder server, or the Kafka broker, is stopped while the
consumer (the real CLI) is receiving a stream of files from a background producer, and
started again. Nothing may be lost or doubled, and the consumer must ride it out.

The component each test stops is its own (tests/integration/own_stack.py: a real Girder
with its database, or a real Kafka broker, started for the test on free ports), so the
other tests of a parallel run go on with the session's stack meanwhile. It is always
started again, and waited for until it serves, even when the test fails.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder, root_folder_or_none)
from tests.integration.kafka_checks import BackgroundProducer, committed_offsets, end_offsets
from tests.integration.local_files import log_uniform_files
from tests.integration.own_stack import own_stack
from tests.integration.programs import (RETRY_LINE, Program, consumer_argv, consumer_env, girder_serves, kafka_serves, stop_line, wait_for, write_fault_config)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

N_FILES = 60
PRODUCE_SECONDS = 24.0
GIRDER_DOWN_SECONDS = 30
KAFKA_DOWN_SECONDS = 15
#: The idle stop must not end the run during an outage. While Girder is down the failed
#: uploads waiting for their retry keep the run from being idle; while the broker is
#: down no message arrives, but a broker that does not answer is not "no new message":
#: both idle limits are shorter than the outages on purpose.
MAX_IDLE = 8
MAX_IDLE_KAFKA = 8
#: Upload retries of the Girder test (timings.py): several during the outage, and the
#: first after it within seconds, not after the production schedule's 30 s wait.
GIRDER_RETRY_TIMINGS = {"GUS_TIMING_UPLOAD_RETRY_DELAYS": "1,2,4",
                        "GUS_TIMING_UPLOAD_RETRY_MAX_SECONDS": "4"}
#: The broker test asks for a progress line this often, to see the loop go on. A step
#: may be slow (an idle check asks the broker for up to 5 s), but the loop never stands
#: still for a session timeout or an outage.
PROGRESS_SECONDS = 2
MAX_PROGRESS_GAP = 6



@pytest.fixture
def own_girder(tmp_path, stack_env):
    """``(stack env with a Girder of this test's own, that Girder's client, a collection
    in it)``: the session's Kafka, a Girder the test may stop."""
    from girder_client import GirderClient
    with own_stack(tmp_path / "stack", "girder") as own:
        env = {**stack_env, **own.env}
        client = GirderClient(apiUrl=env["GIRDER_API_URL"])
        client.authenticate(apiKey=env["GIRDER_API_KEY"])
        yield own, env, client, client.createCollection("outage", public=False)


@pytest.fixture
def own_kafka(tmp_path, stack_env):
    """``(stack env with a Kafka broker of this test's own, its admin client, a topic of
    4 partitions in it)``: the session's Girder, a broker the test may stop."""
    from confluent_kafka.admin import AdminClient, NewTopic
    with own_stack(tmp_path / "stack", "kafka") as own:
        env = {**stack_env, **own.env}
        admin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]})
        topic = "outage"
        admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[
            topic].result(timeout=60)
        yield own, env, admin, topic


def _start(tmp_path: Path, stack_env, prefect_env, topic: str, group: str, collection: dict,
           programs: list[Program], seed: int, max_idle: float, *extra: str,
           timings: dict[str, str] | None = None):
    files = log_uniform_files(N_FILES, seed, 1024, 1 << 20)
    out = tmp_path / "out"
    program = Program(
        consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                      write_fault_config(tmp_path / "consumer.config"), max_idle, *extra),
        tmp_path / "consumer.out", cwd=tmp_path,
        env={**consumer_env(stack_env, prefect_env), **(timings or {})},
        stdin=subprocess.DEVNULL)
    programs.append(program)
    producer = BackgroundProducer(stack_env["KAFKA_BOOTSTRAP_SERVERS"], topic, files,
                                  interval=PRODUCE_SECONDS / N_FILES)
    producer.start()
    return files, out, program, producer


def _landed(gc, root_path: str, files: dict[str, bytes]) -> int:
    root = root_folder_or_none(gc, root_path)
    return len(complete_in_girder(gc, root["_id"], files)) if root else 0


def _check_end(gc, kafka_admin, bootstrap: str, program: Program, files, topic: str,
               group: str, root_path: str, log_file: tuple[Path, ...], max_idle: float) -> dict:
    code = program.wait(240)
    assert code == 0, program.describe(log_file)
    summary = stop_line(program.output())
    assert summary["reason"].startswith(f"no new message for {max_idle:g}s"), summary
    assert summary["failed"] == 0, f"files failed for good: {summary}\n{program.describe(log_file)}"
    root = root_folder_or_none(gc, root_path)
    assert root is not None, program.describe(log_file)
    assert_exactly_once(gc, root["_id"], files, topic, root_path=root_path)
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic), (
        f"the group did not commit to the end: {committed_offsets(kafka_admin, group, topic)}"
        f" != {end_offsets(bootstrap, topic)}\n{program.describe(log_file)}")
    return summary


@pytest.mark.timeout(420)
def test_girder_down_for_30s_mid_stream_loses_nothing_and_retries(
        tmp_path, own_girder, prefect_env, make_topic, make_group, kafka_admin, programs):
    own, stack_env, girder_client, collection = own_girder
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    topic, group = make_topic(partitions=4), make_group()
    files, out, program, producer = _start(tmp_path, stack_env, prefect_env, topic, group,
                                           collection, programs, seed=31, max_idle=MAX_IDLE,
                                           timings=GIRDER_RETRY_TIMINGS)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    wait_for(lambda: _landed(girder_client, root_path, files) >= 3,
             "the first files in Girder", program, log_file, timeout=90)
    before = _landed(girder_client, root_path, files)
    assert producer.is_alive(), "the stream ended before the outage: it would not be mid-stream"
    with own.stopped("girder", lambda: girder_serves(api_url)):
        down_at = time.monotonic()
        while time.monotonic() - down_at < GIRDER_DOWN_SECONDS:
            program.assert_alive(log_file)
            time.sleep(1)
        produced_during = producer.sent
    back_at = time.monotonic()
    program.assert_alive(log_file)
    producer.finish()
    summary = _check_end(girder_client, kafka_admin, bootstrap, program, files, topic, group,
                         root_path, log_file, MAX_IDLE)
    text = program.output() + "".join(p.read_text(errors="replace") for p in log_file)
    retries = RETRY_LINE.findall(text)
    assert retries, f"no retry of a failed upload in the log\n{program.describe(log_file)}"
    assert "Girder unreachable" in text, program.describe(log_file)
    print(f"[girder outage] {before} files in Girder when it stopped; {produced_during} of "
          f"{producer.sent} messages produced by the end of the outage; "
          f"{len(retries)} retry lines; all {len(files)} files uploaded "
          f"{time.monotonic() - back_at:.1f}s after Girder was back (incl. {MAX_IDLE}s idle); "
          f"{summary}", flush=True)


@pytest.mark.timeout(420)
def test_broker_restart_mid_stream_loses_and_doubles_nothing(
        tmp_path, own_kafka, prefect_env, make_group, make_collection, girder_client,
        programs):
    own, stack_env, kafka_admin, topic = own_kafka
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    group, collection = make_group(), make_collection()
    files, out, program, producer = _start(tmp_path, stack_env, prefect_env, topic, group,
                                           collection, programs, 32, MAX_IDLE_KAFKA,
                                           "--progress_seconds", str(PROGRESS_SECONDS))
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    wait_for(lambda: _landed(girder_client, root_path, files) >= 3,
             "the first files in Girder", program, log_file, timeout=90)
    before = _landed(girder_client, root_path, files)
    assert producer.is_alive(), "the stream ended before the restart: it would not be mid-stream"
    with own.stopped("kafka", lambda: kafka_serves(bootstrap, topic)):
        down_at = time.monotonic()
        while time.monotonic() - down_at < KAFKA_DOWN_SECONDS:
            program.assert_alive(log_file)
            time.sleep(1)
    back_at = time.monotonic()
    program.assert_alive(log_file)
    at_restart = _landed(girder_client, root_path, files)
    wait_for(lambda: _landed(girder_client, root_path, files) > at_restart,
             "a file uploaded after the broker restart", program, log_file, timeout=120)
    first_after = time.monotonic() - back_at
    producer.finish()
    summary = _check_end(girder_client, kafka_admin, bootstrap, program, files, topic, group,
                         root_path, log_file, MAX_IDLE_KAFKA)
    # The loop went on while the broker was away (no commit waits for the coordinator):
    # a progress line came every PROGRESS_SECONDS, give or take a slow step.
    gaps = [float(g) for g in re.findall(r"over the last (\d+) s", program.output())]
    assert len(gaps) >= 10 and max(gaps) <= MAX_PROGRESS_GAP, (
        f"progress lines {gaps} s apart: the loop stood still\n{program.describe(log_file)}")
    print(f"[broker restart] {before} files in Girder when the broker stopped for "
          f"{KAFKA_DOWN_SECONDS}s; all {len(files)} files in Girder once; first file after the "
          f"restart {first_after:.1f}s after the broker was back, the run ended "
          f"{time.monotonic() - back_at:.1f}s after (incl. {MAX_IDLE_KAFKA}s idle); {summary}",
          flush=True)
