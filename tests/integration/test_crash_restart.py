"""Crash and restart: the consumer is killed with SIGKILL at each named crash point of the
commit order (``GUS_FAILPOINTS``, see :mod:`girder_upload_stream.failpoints`), restarted
each time with the same consumer group and output folder, and finally run until idle.

The promise checked: every file ends up in Girder exactly once with its sha256, the
processed registry lists every file, and nothing is left ``in_progress``.

300 files of 1 KiB to 4 MiB (log-uniform, seeded, five folder levels) are cut into
64 KiB chunks: half of the files then span several chunks (up to 64) spread over the
4 partitions by their keys, so at every kill several files are partly read on several
partitions at once, which is what the commit rule has to get right. (With the default
512 KiB chunks three files in four would be a single message, and "mid-file" would
rarely be mid-file.)
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder, folder_by_path, root_folder_or_none)
from tests.integration.kafka_checks import committed_offsets, end_offsets
from tests.integration.local_files import (in_progress_rows, log_uniform_files, n_chunks, processed_rel_paths, write_tree)
from tests.integration.programs import (Program, consumer_argv, consumer_env, finish, produce_ours, stop_line, write_fault_config)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

CHUNK_SIZE = 65_536
N_FILES = 300
SEED = 20_505
RUN_TIMEOUT = 150.0
MAX_IDLE = 6
#: (crash point, pass that kills), in this order, each in a fresh process of the same
#: group. The counts are per process and land mid-stream. A run reads poll batches of up
#: to 500 messages, uploads the files each batch completes as one unit (up to 64 files)
#: and commits at most once a second, when a unit's files let an offset move: so the
#: first commit of a run comes within a second of its first poll, the second after its
#: first unit, and a whole run of this topic makes only a handful of commits and units.
CRASHES = [
    ("chunk.added", 400),   # mid-file: ~15% of the chunks read, many files half-read
    ("commit.before", 2),   # mid-commit: registries saved, offsets not committed yet
    ("upload.mid", 40),     # mid-upload: an item created in Girder, its file not yet
    ("commit.after", 2),    # just after the broker accepted a commit
    ("upload.done", 2),     # a unit uploaded, its files' offsets not settled yet
]


@pytest.fixture(scope="module")
def crash_files() -> dict[str, bytes]:
    return log_uniform_files(N_FILES, SEED, 1024, 4 << 20)



@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_sigkill_at_each_crash_point_then_restart_uploads_each_file_once(
        mode, crash_files, tmp_path, stack_env, prefect_env, make_topic, make_group,
        make_collection, girder_client, kafka_admin, programs):
    files = crash_files
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    write_tree(tmp_path / "tree", files)
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path, chunk_size=CHUNK_SIZE),
           "our produce", timeout=300)
    n_messages = sum(n_chunks(data, CHUNK_SIZE) for data in files.values())
    assert sum(end_offsets(bootstrap, topic).values()) == n_messages

    out = tmp_path / "out"
    logs = out / "LOGS"
    log_file = (logs / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"], out, group,
                         write_fault_config(tmp_path / "consumer.config"), MAX_IDLE,
                         "--mode", mode)
    history = []
    for index, (point, count) in enumerate(CRASHES, start=1):
        started = time.monotonic()
        program = Program(argv, tmp_path / f"run{index}-{point}.out", cwd=tmp_path,
                          env=consumer_env(stack_env, prefect_env, f"{point}={count}"),
                          stdin=subprocess.DEVNULL)
        programs.append(program)
        code = program.wait(RUN_TIMEOUT)
        # -9: the process died of SIGKILL (the failpoint), not of an error or a stop.
        assert code == -signal.SIGKILL, (
            f"run {index} ({point}={count}) was expected to be killed at the crash point "
            f"(returncode -9), got {code}\n{program.describe(log_file)}")
        assert f"failpoint {point} reached" in program.output(), program.describe(log_file)
        root = root_folder_or_none(girder_client, root_path)
        landed = len(complete_in_girder(girder_client, root["_id"], files)) if root else 0
        history.append((point, count, round(time.monotonic() - started, 1), landed,
                        dict(sorted(committed_offsets(kafka_admin, group, topic).items()))))
        print(f"[crash {mode}] run {index}: killed at {point}={count} after "
              f"{history[-1][2]}s; {landed}/{len(files)} files complete in Girder; "
              f"committed {history[-1][4]}", flush=True)

    started = time.monotonic()
    final = Program(argv, tmp_path / "final.out", cwd=tmp_path,
                    env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
    programs.append(final)
    code = final.wait(RUN_TIMEOUT)
    assert code == 0, final.describe(log_file)
    summary = stop_line(final.output())
    assert summary["reason"].startswith(f"no new message for {MAX_IDLE}s"), summary
    print(f"[crash {mode}] final run: {time.monotonic() - started:.1f}s, {summary}; "
          f"topic: {n_messages} messages", flush=True)

    root = folder_by_path(girder_client, root_path)
    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)

    processed = set(processed_rel_paths(logs, topic, group))
    missing = sorted(set(files) - processed)
    assert not missing, f"files not in the processed registry: {missing}"
    stuck = [(str(row.rel_filepath), row.status, dict(row.extra))
             for row in in_progress_rows(logs, topic, group) if row.status == "in_progress"]
    assert not stuck, f"files left in_progress in the registry: {stuck}"

    # Every message is accounted for: the group's committed offsets reached the end.
    assert committed_offsets(kafka_admin, group, topic) == end_offsets(bootstrap, topic), (
        f"committed {committed_offsets(kafka_admin, group, topic)} != end "
        f"{end_offsets(bootstrap, topic)}\n{final.describe(log_file)}")

    if mode == "disk":
        # Each file is deleted once uploaded (as OpenMSIStream does), and the final run
        # deleted what the killed runs left in their staging folders.
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                      if p.is_file() and p.relative_to(out).parts[0] != "LOGS")
        assert not left, f"files left below output_dir after the final run: {left}"
        # ... nor their staging folders, nor the lock file: .gus-staging itself is gone
        assert not (out / ".gus-staging").exists(), \
            f"staging left: {sorted(p.name for p in (out / '.gus-staging').iterdir())}"
