"""Two consumer processes of one group on an 8-partition topic (issue 6, scenario 5):
the second joins while the first holds every file of the topic (read ahead, waiting
for upload), so the rebalance moves half of the partitions with their files. Every file
must still land exactly once: the first process hands the files of the partitions it
loses to their new owner instead of racing it to Girder."""

from __future__ import annotations

import random
import subprocess

import pytest

from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder,
                                             folder_by_path, root_folder_or_none)
from tests.integration.kafka_checks import end_offsets
from tests.integration.local_files import write_tree
from tests.integration.programs import (Program, consumer_argv, consumer_env, finish, produce_ours, stop_line, wait_for)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 240.0


@pytest.mark.timeout(400)
def test_a_second_process_joining_mid_stream_leaves_every_file_once(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, programs):
    rng = random.Random(11)
    files = {f"d{i % 4}/e{i % 7}/f{i:03d}.bin": rng.randbytes(20_000 + i) for i in range(640)}
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic, group, collection = make_topic(partitions=8), make_group(), make_collection()
    write_tree(tmp_path / "tree", files)
    finish(produce_ours(tmp_path / "tree", topic, bootstrap, tmp_path), "our produce",
           timeout=300)
    assert sum(end_offsets(bootstrap, topic).values()) == len(files)

    def start(index: int) -> Program:
        argv = consumer_argv(stack_env["GIRDER_API_URL"], topic, collection["name"],
                             tmp_path / f"out-{index}", group, "local", 8, "--n_threads", "2")
        program = Program(argv, tmp_path / f"consumer-{index}.out", cwd=tmp_path,
                          env=consumer_env(stack_env, prefect_env), stdin=subprocess.DEVNULL)
        programs.append(program)
        return program

    first = start(1)
    root_path = default_root_path(collection["name"], topic)

    def first_is_uploading() -> bool:  # it has read the topic ahead: files land
        root = root_folder_or_none(girder_client, root_path)
        return root is not None and bool(complete_in_girder(girder_client, root["_id"], files))

    wait_for(first_is_uploading, "the first process's first files in Girder", first,
             timeout=120)
    second = start(2)
    for program in (first, second):
        assert program.wait(RUN_TIMEOUT) == 0, program.describe()
    lines = [stop_line(p.output()) for p in (first, second)]
    handed = "left to the next owner" in first.output() + second.output()
    print(f"[scale-out] {lines}; files handed over at the rebalance: {handed}", flush=True)
    assert_exactly_once(girder_client, folder_by_path(girder_client, root_path)["_id"],
                        files, topic, root_path=root_path)
    assert sum(line["uploaded"] + line["skipped"] for line in lines) >= len(files), lines
