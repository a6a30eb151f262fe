"""Support of the OpenMSIStream test cases re-created against the real stack
(``test_openmsistream_cases.py``, ``test_openmsistream_faults.py`` and
``test_openmsistream_facts.py``).

A :class:`Case` is one scenario: a fresh topic, consumer group, Girder root folder and
output folder, and a :class:`~tests.integration.girder_faults.FaultProxy` in front of
the real Girder that every consumer of the case talks to. ``case.run(...)`` runs our
CLI to its idle stop; ``case.run_openmsistream(...)`` starts the real OpenMSIStream
1.8.8 ``GirderUploadStreamProcessor`` (a black box, through its console script).
"""

from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from girder_upload_stream.wire.codec import chunk_file, encode_chunk
from girder_upload_stream.shared_types import RETRIED_NEXT_RUN
from tests.integration.girder_faults import FaultProxy
from tests.integration.kafka_checks import (committed_offsets, committed_with_metadata,
                                            end_offsets, produce_raw)
from tests.integration.local_files import CHUNK_SIZE, in_progress_rows, processed_rel_paths
from tests.integration.programs import (OMSI_BIN, Program, consumer_argv, consumer_env, stop_line,
                                        wait_for, write_fault_config, write_omsi_config)

__all__ = ["RETRIED_NEXT_RUN", "MAX_IDLE", "RUN_TIMEOUT", "Case", "Finished", "case",
           "produce_files"]

MAX_IDLE = 6
RUN_TIMEOUT = 240.0


def produce_files(bootstrap: str, topic: str, files: dict[str, bytes],
                  partition: int | None = None) -> dict[str, list[tuple[int, int]]]:
    """Produce ``{relative path: bytes}`` as OpenMSIStream chunk messages (64 KiB chunks,
    what ``girder-upload-stream produce`` sends), all to ``partition`` if given, else
    spread by key; returns each file's ``[(partition, offset)]``."""
    messages, owners = [], []
    for rel, data in files.items():
        subdir, _, name = rel.rpartition("/")
        for chunk in chunk_file(data, subdir, CHUNK_SIZE, filename=name):
            key, value = encode_chunk(chunk)
            messages.append((key, value, partition))
            owners.append(rel)
    where: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for rel, spot in zip(owners, produce_raw(bootstrap, topic, messages)):
        where[rel].append(spot)
    return dict(where)


@dataclass
class Finished:
    """A consumer run that ended: its exit code, console output and log file's text."""

    program: Program
    code: int
    output: str
    log: str

    @property
    def text(self) -> str:
        return self.output + self.log

    def summary(self) -> dict:
        return stop_line(self.output)


@dataclass
class Case:
    """One scenario's topic, group, root folder, output folder and proxy."""

    tmp: Path
    stack_env: dict[str, str]
    prefect_env: dict[str, str]
    topic: str
    group: str
    collection: dict
    root: dict
    proxy: FaultProxy
    programs: list[Program]
    kafka_admin: object
    runs: int = 0
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"
        self.config = write_fault_config(self.tmp / "consumer.config")

    @property
    def bootstrap(self) -> str:
        return self.stack_env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def logs(self) -> Path:
        return self.out / "LOGS"

    def produce(self, files: dict[str, bytes], partition: int | None = None):
        return produce_files(self.bootstrap, self.topic, files, partition)

    def argv(self, *extra: str, max_idle: float = MAX_IDLE, root: bool = True,
             collection: str | None = None) -> list[str]:
        """Our ``girder-upload-stream run`` through the proxy: below the case's root
        folder (``root``), or else in the layout of ``collection`` (default: the case's)."""
        where = ("--girder_root_folder_id", self.root["_id"]) if root else ()
        return consumer_argv(self.proxy.url, self.topic,
                             collection or self.collection["name"], self.out, self.group,
                             self.config, max_idle, *where, *extra)

    def start(self, argv: list[str], api_key: str | None = None,
              timings: dict[str, str] | None = None) -> Program:
        """Start our CLI; ``timings``: ``GUS_TIMING_*`` variables of this run."""
        self.runs += 1
        env = {**consumer_env(self.stack_env, self.prefect_env), **(timings or {})}
        if api_key is not None:
            env["GIRDER_API_KEY"] = api_key
        program = Program(argv, self.tmp / f"run{self.runs}.out", cwd=self.tmp, env=env,
                          stdin=subprocess.DEVNULL)
        self.programs.append(program)
        return program

    def finish(self, program: Program, timeout: float = RUN_TIMEOUT) -> Finished:
        code = program.wait(timeout)
        log = self.logs / "GirderUploadStreamProcessor.log"
        return Finished(program, code, program.output(),
                        log.read_text(errors="replace") if log.is_file() else "")

    def run(self, *extra: str, max_idle: float = MAX_IDLE, root: bool = True,
            collection: str | None = None, api_key: str | None = None,
            timeout: float = RUN_TIMEOUT, timings: dict[str, str] | None = None) -> Finished:
        """Run our CLI to its idle stop (or its own end) and return what it did."""
        argv = self.argv(*extra, max_idle=max_idle, root=root, collection=collection)
        return self.finish(self.start(argv, api_key, timings), timeout)

    # -- OpenMSIStream -----------------------------------------------------------------
    def start_openmsistream(self, *extra: str, api_key: str | None = None,
                            root: bool = True, out: Path | None = None) -> Program:
        """The real OpenMSIStream 1.8.8 consumer through the proxy (stop it with ``q``)."""
        self.runs += 1
        config = write_omsi_config(self.tmp / "omsi.config", self.bootstrap)
        where = ("--girder_root_folder_id", self.root["_id"]) if root else ()
        argv = [OMSI_BIN / "GirderUploadStreamProcessor", self.proxy.url,
                api_key or self.stack_env["GIRDER_API_KEY"], "--config", config,
                "--topic_name", self.topic, "--consumer_group_id", self.group,
                "--output_dir", out or self.tmp / "omsi_out", "--update_seconds", "5",
                *where, *extra]
        program = Program(argv, self.tmp / f"omsi{self.runs}.out", cwd=self.tmp,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        self.programs.append(program)
        return program

    def run_openmsistream(self, until, what: str, *extra: str, api_key: str | None = None,
                          root: bool = True, timeout: float = 120) -> str:
        """Run OpenMSIStream until ``until(output)`` holds, stop it with ``q`` as a user
        would, and return its output (console and log file)."""
        out = self.tmp / "omsi_out"
        program = self.start_openmsistream(*extra, api_key=api_key, root=root, out=out)
        wait_for(lambda: until(program.output()), what, program, timeout=timeout)
        program.stop(timeout=60)
        logs = "".join(p.read_text(errors="replace") for p in (out / "LOGS").glob("*.log"))
        return program.output() + logs

    # -- what is left behind -----------------------------------------------------------
    def committed(self) -> dict[int, int]:
        return committed_offsets(self.kafka_admin, self.group, self.topic)

    def commit_metadata(self) -> dict[int, str]:
        return {p: meta for p, (_, meta) in
                committed_with_metadata(self.kafka_admin, self.group, self.topic).items()}

    def end(self) -> dict[int, int]:
        return end_offsets(self.bootstrap, self.topic)

    def behind(self) -> dict[int, tuple[int, int]]:
        """``{partition: (committed, end)}`` of the non-empty partitions whose committed
        offset is not the end of the partition (empty: the group committed everything)."""
        committed = self.committed()
        return {p: (committed.get(p, -1), end) for p, end in self.end().items()
                if end > 0 and committed.get(p, -1) != end}

    def nothing_committed(self) -> bool:
        return all(offset < 0 for offset in self.committed().values())

    def failed_rows(self) -> dict[str, str]:
        """``{relative path: reason}`` of the in-progress registry's ``failed`` rows."""
        return {str(row.rel_filepath): str(row.extra.get("reason", ""))
                for row in in_progress_rows(self.logs, self.topic, self.group)
                if row.status == "failed"}

    def processed(self) -> list[str]:
        return processed_rel_paths(self.logs, self.topic, self.group)


@pytest.fixture
def case(tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
         girder_client, kafka_admin, programs) -> Iterator[Case]:
    """A fresh :class:`Case`: a 2-partition topic, a group, a root folder in a fresh
    collection, and a proxy in front of the real Girder (closed after the test)."""
    collection = make_collection()
    root = girder_client.createFolder(collection["_id"], "root", parentType="collection")
    with FaultProxy(stack_env["GIRDER_API_URL"]) as proxy:
        yield Case(tmp_path, stack_env, prefect_env, make_topic(partitions=2), make_group(),
                   collection, root, proxy, programs, kafka_admin)
