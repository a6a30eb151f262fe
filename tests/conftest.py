"""One test run, whether one process or several (``pytest -n N``, pytest-xdist): the
run's shared folder, and the stack components the run started, stopped at its end.

The process that starts the run (pytest itself, or xdist's controller) makes a folder
and names it in ``GUS_TEST_RUN_DIR`` before any worker starts; workers inherit it. The
integration fixtures (tests/integration/conftest.py) start missing stack components
under a lock in that folder, so only one worker starts each, and list what they started
there; that process stops those components when the whole run ends (no worker can stop
a component another worker still uses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

__all__ = ["RUN_DIR_VARIABLE", "run_dir", "started_file"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_DIR_VARIABLE = "GUS_TEST_RUN_DIR"
_OWNER = pytest.StashKey[Path]()


def run_dir() -> Path:
    """The folder this test run's processes share."""
    return Path(os.environ[RUN_DIR_VARIABLE])


def started_file() -> Path:
    """Stack components this run started, one name a line, in start order."""
    return run_dir() / "started-components"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or RUN_DIR_VARIABLE in os.environ:
        return  # an xdist worker, or a run inside a run: the folder exists
    path = Path(tempfile.mkdtemp(prefix="gus-test-run-"))
    os.environ[RUN_DIR_VARIABLE] = str(path)
    config.stash[_OWNER] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_OWNER, None)
    if path is None:
        return
    try:
        names = (path / "started-components").read_text().split()
    except FileNotFoundError:
        names = []
    if names:  # stackctl stops them in reverse order
        subprocess.run([sys.executable, "-m", "stack.stackctl", "down", *names],
                       cwd=REPO_ROOT, capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(RUN_DIR_VARIABLE, None)
