"""The bound of files in progress (``--max_files_in_progress``) loses nothing, on the real
broker and Girder through the real CLI (offsets rule 10).

Found on main: one consumer started after 1,200 files of 3 chunks were produced on 4
partitions, bound 1000; 200 files were refused "too many files in progress", their
offsets committed, the stop line said "0 failed", and they never reached Girder. Here at
a small scale: bound 20, 120 files of 3 chunks, all produced before the consumer starts.
The first chunk of every file is on partition 0 in file order, the other chunks on
partitions 1 to 3 in the reverse order, so whatever the order librdkafka hands the
partitions over, far more than 20 files are begun before any completes: the bound is
reached, and every place is held by a file whose missing chunks lie behind chunks put
off in the other partitions (the deadlock a pausing consumer would meet). Every file
must land exactly once, the group's offsets end at the end of the topic, nothing is
failed or left in progress. And chunks still waiting when a run stops (every place held
by partial files) stay uncommitted: the next run uploads their files.

OpenMSIStream 1.8.8 has no such bound (its files in progress are an unbounded dict), so
it lands all these files; the bound must never land fewer.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
import subprocess

import pytest

from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from tests.integration.girder_checks import assert_exactly_once, default_root_path, folder_by_path
from tests.integration.kafka_checks import committed_offsets, end_offsets, produce_raw
from tests.integration.local_files import in_progress_rows, processed_rel_paths
from tests.integration.programs import (Program, consumer_argv, consumer_env, stop_line,
                                        write_fault_config)

pytestmark = pytest.mark.integration

N_FILES, BOUND, CHUNK = 120, 20, 1000
MAX_IDLE = 5
RUN_TIMEOUT = 90.0


def _messages(files: dict[str, bytes]) -> list[tuple[str, bytes, int]]:
    """First chunks on partition 0 in file order; the others on 1..3 (by a hash of the
    path and chunk number, as the producer's key spreads them) in reverse file order."""
    firsts, others = [], []
    for rel, data in files.items():
        chunks = list(chunk_file(data, "", CHUNK, filename=rel))
        assert len(chunks) == 3
        firsts.append((*encode_chunk(chunks[0]), 0))
        for chunk in chunks[1:]:
            spread = hashlib.sha256(f"{rel}:{chunk.chunk_i}".encode()).digest()[0] % 3
            others.append((*encode_chunk(chunk), 1 + spread))
    return firsts + others[::-1]


@pytest.mark.timeout(180)
def test_files_beyond_max_files_in_progress_wait_and_all_land_exactly_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    rng = random.Random(1200)
    files = {f"b{n:03d}.bin": rng.randbytes(2 * CHUNK + 1 + n) for n in range(N_FILES)}
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    produce_raw(bootstrap, topic, _messages(files))  # all waiting before the consumer

    out = tmp_path / "out"
    logs = out / "LOGS"
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         write_fault_config(tmp_path / "consumer.config"), MAX_IDLE,
                         "--max_files_in_progress", str(BOUND))
    program = Program(argv, tmp_path / "run.out", cwd=tmp_path,
                      env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(program)
    code = program.wait(RUN_TIMEOUT)
    log_file = logs / "GirderUploadStreamProcessor.log"
    assert code == 0, program.describe((log_file,))
    summary = stop_line(program.output())
    assert summary["reason"].startswith(f"no new message for {MAX_IDLE}s"), summary
    assert (summary["uploaded"], summary["failed"]) == (N_FILES, 0), summary
    # The bound was reached: chunks of further files waited (and were read again).
    output = program.output()
    assert "(--max_files_in_progress): chunks of further files wait" in output, output

    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)
    processed = collections.Counter(processed_rel_paths(logs, topic, group))
    assert processed == collections.Counter(dict.fromkeys(files, 1))  # one row each
    assert in_progress_rows(logs, topic, group) == []  # nothing failed, nothing stuck
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic), (
        program.describe((log_file,)))


@pytest.mark.timeout(180)
def test_chunks_still_waiting_when_a_run_stops_are_read_by_the_next_run(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    """Twenty partial files that never complete take every place; the thirty files after
    them (on the same partition) wait. The first run stops idle with them uncommitted (and says so); the next
    run, whose partial files go stale (``--stale_partial_seconds 2``) and make room,
    uploads every one of them once, and the commit reaches the end."""
    rng = random.Random(2020)
    partial = [(*encode_chunk(next(iter(chunk_file(rng.randbytes(2 * CHUNK), "", CHUNK,
                                                   filename=f"partial-{n}.bin")))), 0)
               for n in range(BOUND)]
    files = {f"later-{n:02d}.bin": rng.randbytes(2 * CHUNK + 1 + n) for n in range(30)}
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    later = [(key, value, 0) for key, value, _ in _messages(files)]  # one partition:
    topic, group, collection = make_topic(partitions=1), make_group(), make_collection()
    produce_raw(bootstrap, topic, partial + later)  # the partial files first, in order

    out = tmp_path / "out"
    logs = out / "LOGS"
    config = write_fault_config(tmp_path / "consumer.config")
    outputs = []
    for name, extra in (("first", ()), ("second", ("--stale_partial_seconds", "2"))):
        argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out,
                             group, config, MAX_IDLE, "--max_files_in_progress", str(BOUND),
                             *extra)
        program = Program(argv, tmp_path / f"{name}.out", cwd=tmp_path,
                          env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
        programs.append(program)
        assert program.wait(RUN_TIMEOUT) == 0, program.describe(
            (logs / "GirderUploadStreamProcessor.log",))
        outputs.append((stop_line(program.output()), program.output()))
    (first, first_out), (second, _) = outputs
    assert (first["uploaded"], first["failed"]) == (0, 0), first
    assert "chunk(s) of files beyond --max_files_in_progress still wait, uncommitted" \
        in first_out, first_out
    # ... and the command says how many, after its stop line.
    waiting = re.search(r"^(\d+) chunk\(s\) of files beyond --max_files_in_progress were "
                        r"left waiting, uncommitted", first_out, re.MULTILINE)
    assert waiting and int(waiting.group(1)) > 0, first_out
    assert (second["uploaded"], second["failed"]) == (len(files), 0), second

    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)
    processed = collections.Counter(processed_rel_paths(logs, topic, group))
    assert processed == collections.Counter(dict.fromkeys(files, 1))
    stale = in_progress_rows(logs, topic, group)  # only the partial files, as stale
    assert sorted(str(r.rel_filepath) for r in stale) == sorted(
        f"partial-{n}.bin" for n in range(BOUND))
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic)
