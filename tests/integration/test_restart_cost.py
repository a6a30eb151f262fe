"""Restart cost: how much of a topic a restarted consumer reads again.

About 200 MiB of files (1 KiB to 8 MiB, log-uniform, seeded) are produced to 4
partitions in the producer's default 512 KiB chunks. The consumer (the real CLI) is
killed with SIGKILL when it creates the Girder item of the file in the middle of the
stream (failpoint ``upload.mid`` at half the file count), then restarted with the same
group until idle. Measured and printed (and written to ``restart_cost.json`` in the
test's tmp dir):

* the messages read by the restarted run (its final ``stopped (...)`` line) as a ratio
  to the messages of the files that were not complete in Girder at the kill: 1.0 means
  it read exactly what it had to; OpenMSIStream, which re-reads the whole topic, would
  be at total / incomplete (about 2 here);
* the time from the restart to the first new file complete in Girder (informative).

Asserted: every file ends up in Girder exactly once, and the restart reads less than
the whole topic (< 95% of it; the incomplete files alone are about 55-60%), which a
consumer that re-reads everything, as OpenMSIStream does, cannot. The overlap beyond
the incomplete files depends on timing (files uploaded in the last commit interval and
the registry save before it, units lingering before their upload, units finishing out
of order): 0.10-0.24 of the topic seen on a quiet machine, up to 0.35 under a full
test run's load, so the bound leaves that room; the ratio is the measurement.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder, folder_by_path, root_folder_or_none)
from tests.integration.kafka_checks import committed_with_metadata, end_offsets, messages_at
from tests.integration.local_files import log_uniform_files, n_chunks, write_tree
from tests.integration.programs import (Program, consumer_argv, consumer_env, finish, produce_ours, stop_line)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

CHUNK_SIZE = 524_288  # the producer's default, as OpenMSIStream's
TOTAL_BYTES = 200 << 20
SEED = 7_200
MAX_IDLE = 6
RUN_TIMEOUT = 180.0
MAX_REREAD_FRACTION = 0.95


def _files() -> dict[str, bytes]:
    return log_uniform_files(None, SEED, 1024, 8 << 20, total_bytes=TOTAL_BYTES,
                             folders=("", "scans", "scans/day 1", "spectra/raw"))



@pytest.mark.timeout(480)
def test_restart_after_a_kill_at_half_rereads_little_more_than_the_incomplete_files(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    files = _files()
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    write_tree(tmp_path / "tree", files)
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path, chunk_size=CHUNK_SIZE),
           "our produce", timeout=300)
    messages_of = {rel: n_chunks(data, CHUNK_SIZE) for rel, data in files.items()}
    total_messages = sum(messages_of.values())
    assert sum(end_offsets(bootstrap, topic).values()) == total_messages

    out = tmp_path / "out"
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    # The bundled "local" config, so the restart is timed with the program's own
    # consumer settings (its 10 s session: the killed consumers' partitions come back
    # to the group when their session expires).
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         "local", MAX_IDLE)
    kill_at = len(files) // 2
    first = Program(argv, tmp_path / "first.out", cwd=tmp_path,
                    env=consumer_env(stack_env, prefect_env, f"upload.mid={kill_at}"),
                    stdin=subprocess.DEVNULL)
    programs.append(first)
    started = time.monotonic()
    code = first.wait(RUN_TIMEOUT)
    first_seconds = time.monotonic() - started
    assert code == -signal.SIGKILL, (
        f"expected the kill at the {kill_at}th item (returncode -9), got {code}\n"
        f"{first.describe(log_file)}")
    root = folder_by_path(girder_client, root_path)
    at_kill = complete_in_girder(girder_client, root["_id"], files)
    incomplete = set(files) - at_kill
    incomplete_messages = sum(messages_of[rel] for rel in incomplete)
    committed_at_kill = committed_with_metadata(kafka_admin, group, topic)
    assert incomplete_messages, "every file was complete at the kill: nothing to measure"

    restart = Program(argv, tmp_path / "restart.out", cwd=tmp_path,
                      env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(restart)
    restarted = time.monotonic()
    first_new_upload = None
    while restart.proc.poll() is None and time.monotonic() - restarted < RUN_TIMEOUT:
        if first_new_upload is None:
            current = root_folder_or_none(girder_client, root_path)
            if current and complete_in_girder(girder_client, current["_id"], files) - at_kill:
                first_new_upload = time.monotonic() - restarted
        time.sleep(0.2)
    code = restart.wait(10)
    restart_seconds = time.monotonic() - restarted
    assert code == 0, restart.describe(log_file)
    summary = stop_line(restart.output())
    assert summary["reason"].startswith(f"no new message for {MAX_IDLE}s"), summary

    reread = summary["messages"]
    result = {
        "files": len(files), "bytes": sum(map(len, files.values())),
        "chunk_size": CHUNK_SIZE, "partitions": 4, "total_messages": total_messages,
        "killed_at": f"upload.mid={kill_at}", "first_run_seconds": round(first_seconds, 1),
        "files_complete_at_kill": len(at_kill), "files_incomplete_at_kill": len(incomplete),
        "incomplete_messages": incomplete_messages,
        "end_offsets": end_offsets(bootstrap, topic),
        "committed_at_kill": {p: list(v) for p, v in sorted(committed_at_kill.items())},
        "messages_reread": reread,
        "reread_ratio": round(reread / incomplete_messages, 3),
        "reread_fraction_of_topic": round(reread / total_messages, 3),
        "restart_to_first_new_upload_seconds": (None if first_new_upload is None
                                                else round(first_new_upload, 2)),
        "restart_run_seconds": round(restart_seconds, 1),
        "restart_uploaded": summary["uploaded"], "restart_skipped": summary["skipped"],
    }
    (tmp_path / "restart_cost.json").write_text(json.dumps(result, indent=2))
    print(f"[restart cost] {json.dumps(result)}", flush=True)
    print(f"[restart cost] written to {tmp_path / 'restart_cost.json'}", flush=True)

    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)
    if reread >= MAX_REREAD_FRACTION * total_messages:
        holders = _commit_holders(bootstrap, topic, committed_at_kill, at_kill, files)
        pytest.fail(f"the restart read {reread} of the topic's {total_messages} messages "
                    f"({reread / total_messages:.0%}) for {incomplete_messages} messages of "
                    f"incomplete files.\nWhere each partition's commit stood at the kill:\n"
                    f"{holders}\n{result}")


def _commit_holders(bootstrap: str, topic: str, committed: dict[int, tuple[int, str]],
                    at_kill: set[str], files: dict[str, bytes]) -> str:
    """Which file's chunk each partition's committed offset pointed at, for a diagnosis."""
    from girder_upload_stream.wire.codec import decode_chunk
    found = messages_at(bootstrap, topic, {p: offset for p, (offset, _) in committed.items()})
    lines = []
    for partition, (offset, metadata) in sorted(committed.items()):
        key, value = found.get(partition, (None, None))
        try:
            chunk = decode_chunk(value, key)
            what = (f"chunk {chunk.chunk_i}/{chunk.n_total_chunks} of {chunk.rel_path} "
                    f"({len(files.get(chunk.rel_path, b''))} bytes; complete in Girder at the "
                    f"kill: {chunk.rel_path in at_kill})")
        except Exception as exc:  # noqa: BLE001 - a diagnosis, not a check
            what = f"no readable chunk ({exc})"
        lines.append(f"  partition {partition}: committed {offset} ({metadata}): {what}")
    return "\n".join(lines)
