"""Every entry point answers ``--help`` and does nothing else (issue 24).

Each one is run as a user runs it, in an empty working folder, with Kafka and Prefect
pointed at ports nothing listens on: a program that acted on ``--help`` (created a topic
named ``--help``, saved a Secret block, started serving or the demo) would fail, hang
or leave files behind. Each must exit 0 quickly, print a usage, show its defaults with
no internal placeholder names, and say how the regular expressions are matched.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from girder_upload_stream.cli import main as cli
from girder_upload_stream.cli.run import add_run_arguments

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PY = sys.executable

ENTRY_POINTS = {
    "girder-upload-stream": [BIN / "girder-upload-stream", "--help"],
    "girder-upload-stream run": [BIN / "girder-upload-stream", "run", "--help"],
    "girder-upload-stream produce": [BIN / "girder-upload-stream", "produce", "--help"],
    "GirderUploadStreamProcessor": [BIN / "GirderUploadStreamProcessor", "--help"],
    "secrets": [PY, "-m", "girder_upload_stream.prefect_glue.secrets", "--help"],
    "create_topic.py": [PY, REPO_ROOT / "docs" / "examples" / "create_topic.py", "--help"],
    "serve.py": [PY, REPO_ROOT / "deployments" / "serve.py", "--help"],
    "demo": [PY, "-m", "girder_upload_stream.cli.demo", "--help"],
    "cli.main": [PY, "-m", "girder_upload_stream.cli.main", "--help"],
}

#: Placeholders that name our internals rather than what to type.
INTERNAL_NAMES = ("LOGS_DIR", "HANDLER")


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_exits_0_at_once_and_does_nothing_else(name: str, tmp_path: Path) -> None:
    dead = _dead_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{dead}",
           "PREFECT_API_URL": f"http://127.0.0.1:{dead}/api", "GIRDER_API_KEY": "unused",
           "GIRDER_API_URL": f"http://127.0.0.1:{dead}/api/v1",
           "GUS_STACK_DIR": str(tmp_path / "stack"), "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    done = subprocess.run([str(a) for a in ENTRY_POINTS[name]], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout
    assert done.stderr == "", done.stderr
    assert took < 10, f"{took:.1f}s: --help must not import or start anything heavy"
    assert list(tmp_path.iterdir()) == [], "--help left files behind"
    for placeholder in INTERNAL_NAMES:
        assert placeholder not in done.stdout, placeholder


def _parsers() -> dict[str, argparse.ArgumentParser]:
    processor = argparse.ArgumentParser()
    add_run_arguments(processor, default_config="test")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"girder-upload-stream": parser, "GirderUploadStreamProcessor": processor,
            **{f"girder-upload-stream {n}": p for n, p in sub.choices.items()}}


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_states_its_default(name: str) -> None:
    silent = []
    for action in _parsers()[name]._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction)) or action.required:
            continue
        if "default" not in (action.help or ""):
            silent.append(action.option_strings or action.dest)
    assert not silent, f"options whose --help does not state a default: {silent}"


@pytest.mark.parametrize("name, option", [("girder-upload-stream run", "--download_regex"),
                                          ("GirderUploadStreamProcessor", "--download_regex"),
                                          ("girder-upload-stream produce", "--upload_regex")])
def test_the_regex_options_say_how_they_match(name: str, option: str) -> None:
    [action] = [a for a in _parsers()[name]._actions if option in a.option_strings]
    assert "from its start" in action.help and "re.match" in action.help, action.help


# The paths the demo prints and uses, with the stack kept in another folder: the ones
# stackctl (stack/common.py, stack/girder.py) uses for the same GUS_STACK_DIR.
DEMO_PATHS = r"""
import json
from pathlib import Path
from stack import common
from girder_upload_stream.cli import demo
print(json.dumps({
    "stack": [str(demo.stack_dir()), str(common.STACK_DIR.resolve())],
    "worker_log": [str(demo.worker_log()), str((common.STACK_DIR / "logs" / "worker.log").resolve())],
    "credentials": [str(demo.girder_credentials()),
                    str((common.STACK_DIR / "girder" / "credentials.json").resolve())],
    "demo": [str(demo.demo_dir()), str((common.STACK_DIR / "demo").resolve())]}))
"""


@pytest.mark.parametrize("elsewhere", [True, False])
def test_the_demo_uses_the_stack_folder_stackctl_uses(tmp_path: Path, elsewhere: bool) -> None:
    import json
    env = {k: v for k, v in os.environ.items() if k not in ("GUS_STACK_DIR", "GUS_DEMO_DIR")}
    if elsewhere:
        env["GUS_STACK_DIR"] = str(tmp_path / "elsewhere")
    done = subprocess.run([PY, "-c", DEMO_PATHS], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    for what, (ours, stackctl) in paths.items():
        assert ours == stackctl, what
    root = str(tmp_path / "elsewhere") if elsewhere else str(REPO_ROOT / ".stack")
    assert all(ours.startswith(root) for ours, _ in paths.values()), paths
    if elsewhere:
        assert list(tmp_path.iterdir()) == [], "looking the paths up created folders"
