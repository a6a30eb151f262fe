"""The stack's worker component finds the processes below it (flow runs live in sessions
of their own, so stopping the worker's process group would miss them), and the demo's
deploy command names what it deploys. Nothing of the stack runs: a real shell with
children stands in for a worker and its flow runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from stack.prefect_worker import _descendants


def test_descendants_include_grandchildren_in_other_sessions():
    # sh -> (a child in a new session -> its own child): like worker -> run -> helper.
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
              "time.sleep(30)\n")
    parent = subprocess.Popen(["sh", "-c", f"{sys.executable} -c \"{script}\" & sleep 30"])
    try:
        deadline = time.monotonic() + 20
        found: list[int] = []
        while len(found) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            found = _descendants(parent.pid)
        assert len(found) >= 3, found  # python, its sleeping child, and sleep
        assert parent.pid not in found
        assert _descendants(found[-1]) == []
    finally:
        for pid in [*_descendants(parent.pid), parent.pid]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        parent.wait(10)


def test_start_deploy_names_the_deployments(tmp_path: Path, monkeypatch):
    from girder_upload_stream.prefect_glue import deploying
    seen = {}

    class FakePopen:
        def __init__(self, argv, **kwargs):
            seen.update(argv=argv, **kwargs)

    monkeypatch.setattr(deploying.subprocess, "Popen", FakePopen)
    deploying.start_deploy(tmp_path, Path("p.yaml"), env={"A": "1"}, names=("stream",))
    assert seen["argv"][1:] == ["--no-prompt", "deploy", "--name", "stream",
                                "--prefect-file", "p.yaml"]
    assert seen["env"] == {"A": "1", "PWD": str(tmp_path)} and seen["cwd"] == tmp_path
    deploying.start_deploy(tmp_path, env={})
    assert "--all" in seen["argv"]
