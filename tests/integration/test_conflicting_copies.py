"""Issue 20 sections 1 and 5 on the real broker and Girder, through the real CLI.

Conflicting copies: before the genuine files, the topic holds a forged chunk (same name,
file hash, number and offset, other bytes), half of a second chunking (the same file cut
with another chunk size), and a whole copy failing the sha512 of another file. None may
veto the genuine file: every genuine file lands exactly once, in memory and disk modes,
no row is left failed or in progress (a failed copy registered as ``mismatched_hash`` is
replaced by the processed row of its clean copy), and the group commits to the end of
the topic.

Floods: one chunk each of many two-chunk files that never complete, between the chunks
of a genuine file begun before them, with ``--max_files_in_progress`` small: the excess
waits (offsets rule 10: put off, never rejected nor committed past), the genuine file
lands, and each time the partial files inside the bound are stale they make room for the
next ones; in the end every partial file has its stale ``failed`` row, none is lost to
the bound, and the commit reaches the end.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from dataclasses import replace

import pytest

from girder_upload_stream.wire.codec import Chunk, chunk_file, decode_chunk, encode_chunk
from tests.integration.girder_checks import assert_exactly_once, default_root_path, folder_by_path
from tests.integration.kafka_checks import committed_offsets, end_offsets, produce_raw
from tests.integration.local_files import in_progress_rows, processed_rel_paths
from tests.integration.programs import (Program, consumer_argv, consumer_env, stop_line,
                                        write_fault_config)

pytestmark = pytest.mark.integration

CHUNK_SIZE = 64 << 10
MAX_IDLE = 6
RUN_TIMEOUT = 150.0


def _chunks(data: bytes, rel: str, size: int = CHUNK_SIZE) -> list[Chunk]:
    subdir, _, name = rel.rpartition("/")
    return [decode_chunk(encode_chunk(c)[1]) for c in chunk_file(data, subdir, size,
                                                                   filename=name)]


def _forged(chunk: Chunk) -> Chunk:
    data = bytes(b ^ 0x3C for b in chunk.data)
    return replace(chunk, data=data, chunk_hash=hashlib.sha512(data).digest())


def _message(chunk: Chunk, partition: int) -> tuple[str, bytes, int]:
    key, value = encode_chunk(chunk)
    return key, value, partition


def _run(argv, tmp_path, name, stack_env, prefect_env, programs, logs):
    program = Program(argv, tmp_path / f"{name}.out", cwd=tmp_path,
                      env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(program)
    code = program.wait(RUN_TIMEOUT)
    log_file = (logs / "GirderUploadStreamProcessor.log",)
    assert code == 0, program.describe(log_file)
    return stop_line(program.output()), program


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_forged_chunks_second_chunkings_and_failed_copies_do_not_veto_the_genuine_files(
        mode, tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    rng = random.Random(2020)
    files = {"copies/forged.bin": rng.randbytes(5 * CHUNK_SIZE + 123),
             "copies/rechunked.bin": rng.randbytes(4 * CHUNK_SIZE + 7),
             "copies/after_bad.bin": rng.randbytes(3 * CHUNK_SIZE + 99),
             "plain.bin": rng.randbytes(1000)}
    genuine = {rel: _chunks(data, rel) for rel, data in files.items()}
    before = [
        # A forged chunk of forged.bin: the old rule rejected the whole file on it.
        _message(_forged(genuine["copies/forged.bin"][2]), 0),
        # Half of rechunked.bin cut with another chunk size ("n_total_chunks changed").
        *[_message(c, 1) for c in _chunks(files["copies/rechunked.bin"],
                                           "copies/rechunked.bin", 100_000)[:2]],
        # A whole copy of after_bad.bin whose second chunk has other bytes: it fails the
        # sha512, and the old rule then ignored the clean copy.
        *[_message(_forged(c) if i == 1 else c, i % 2)
          for i, c in enumerate(genuine["copies/after_bad.bin"])],
    ]
    clean = [_message(c, i % 2) for rel in files for i, c in enumerate(genuine[rel])]
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    produce_raw(bootstrap, topic, before + clean)

    out = tmp_path / "out"
    logs = out / "LOGS"
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         write_fault_config(tmp_path / "consumer.config"), MAX_IDLE,
                         "--mode", mode)
    summary, program = _run(argv, tmp_path, "run", stack_env, prefect_env, programs, logs)
    assert summary["reason"].startswith(f"no new message for {MAX_IDLE}s"), summary

    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)
    assert sorted(set(processed_rel_paths(logs, topic, group))) == sorted(files)
    # Whether the failed copy was complete (and registered as mismatched_hash) before
    # the clean copy's chunks came depends on how the partitions interleave; either way
    # the clean copy's processed row replaced it: nothing is left in progress or failed.
    left = [(str(r.rel_filepath), r.status) for r in in_progress_rows(logs, topic, group)]
    assert left == [], left
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic), (
        program.describe((logs / "GirderUploadStreamProcessor.log",)))
    if mode == "disk":
        staged = [p for p in out.rglob("*") if p.is_file()
                  and p.relative_to(out).parts[0] not in ("LOGS",)]
        assert staged == [], staged


@pytest.mark.timeout(300)
def test_a_flood_of_partial_files_is_bounded_and_the_genuine_file_lands(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    rng = random.Random(5)
    data = rng.randbytes(3 * CHUNK_SIZE + 5)
    genuine = _chunks(data, "genuine/file.bin")
    flood = [_chunks(rng.randbytes(32), f"flood-{n}.bin", 16)[0] for n in range(100)]
    bound = 20
    messages = ([_message(genuine[0], 0)] + [_message(c, 0) for c in flood]
                + [_message(c, 0) for c in genuine[1:]])
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=1), make_group(), make_collection()
    produce_raw(bootstrap, topic, messages)

    out = tmp_path / "out"
    logs = out / "LOGS"
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         write_fault_config(tmp_path / "consumer.config"), MAX_IDLE,
                         "--mode", "disk", "--max_files_in_progress", str(bound),
                         "--stale_partial_seconds", "3")
    summary, program = _run(argv, tmp_path, "flood", stack_env, prefect_env, programs, logs)
    assert summary["uploaded"] == 1, summary
    assert "(--max_files_in_progress): chunks of further files wait" in program.output()

    root_path = default_root_path(collection["name"], topic)
    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], {"genuine/file.bin": data}, topic,
                        root_path=root_path)
    rows = in_progress_rows(logs, topic, group)
    # Every partial file was taken in the end (none lost to the bound): each has its
    # stale row, and no chunk was refused for the bound.
    assert sorted(str(r.rel_filepath) for r in rows) == sorted(c.rel_path for c in flood)
    assert all(r.status == "failed" and "incomplete: 1 of 2 chunks" in r.extra["reason"]
               for r in rows), rows[:3]
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic), (
        program.describe((logs / "GirderUploadStreamProcessor.log",)))
