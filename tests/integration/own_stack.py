"""Stack components of a test's own, for a test that stops or restarts one of them.

A test that stops the session's Kafka or Girder must have the stack alone (``serial``,
stack_share.py): with ``pytest -n N`` every other process then waits, in the set-up of
its next integration test, for the running ones to end and for the outage to pass (a
minute and more of the run's wall time, once per such test). A component of the test's
own (a real Kafka broker, or a real Girder with its database, started by
``python -m stack.stackctl`` with a folder and free ports of the test's) can be stopped
and started again while the other tests go on with the session's stack.

Its start costs seconds, not an install: the session stack's installed artifacts (Kafka's
jars, the database server's build, Girder's virtualenv) are linked into the test's
folder, never copied or changed. Each component is stopped by its PID when the block
ends, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OwnStack", "own_stack", "parse_exports"]

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
#: The installed artifacts of each component (stack/*.py ``install``), by component.
_ARTIFACTS = {"kafka": ("kafka/libs",), "mongo": ("mongo/build",),
              "girder": ("mongo/build", "girder/venv")}
#: The port variable of each component; Kafka's controller takes the next port too.
_PORT_VARIABLES = {"kafka": "GUS_KAFKA_PORT", "mongo": "GUS_MONGO_PORT",
                   "girder": "GUS_GIRDER_PORT"}


@dataclass(frozen=True)
class OwnStack:
    """Components of one test: ``settings`` are the ``GUS_*`` variables that name their
    folder and ports, ``env`` their connection settings (``stackctl env``)."""

    settings: dict[str, str]
    env: dict[str, str]

    def stackctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``python -m stack.stackctl ARGS`` on these components; fails the test on error."""
        done = subprocess.run([sys.executable, "-m", "stack.stackctl", *args], cwd=REPO_ROOT,
                              env={**os.environ, **self.settings}, text=True,
                              capture_output=True, timeout=timeout)
        assert done.returncode == 0, (f"stackctl {' '.join(args)} failed ({done.returncode}):\n"
                                      f"{done.stdout}\n{done.stderr}")
        return done

    @contextlib.contextmanager
    def stopped(self, component: str, serves: Callable[[], bool],
                timeout: float = 120) -> Iterator[None]:
        """Stop ``component`` for the ``with`` block; start it again afterwards (even if
        the block fails) and wait until ``serves()``."""
        self.stackctl("down", component)
        try:
            yield
        finally:
            self.stackctl("up", component)
            deadline = time.monotonic() + timeout
            while not serves():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{component} does not serve {timeout:.0f}s after up")
                time.sleep(0.5)


def _session_stack_dir() -> Path:
    return Path(os.environ.get("GUS_STACK_DIR", REPO_ROOT / ".stack"))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(also_next: bool) -> int:
    """A port nothing listens on (and, for Kafka's controller, the next one too)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if not also_next or (port < 65535 and _bindable(port + 1)):
            return port
    raise RuntimeError("no free pair of ports")


def _link_artifacts(folder: Path, components: tuple[str, ...]) -> None:
    """Link the session stack's installed artifacts into ``folder`` (where installed:
    otherwise ``stackctl up`` installs them there)."""
    source = _session_stack_dir()
    for relative in {path for name in components for path in _ARTIFACTS[name]}:
        target = source / relative
        if target.exists():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).symlink_to(target.resolve(), target_is_directory=True)


def parse_exports(text: str) -> dict[str, str]:
    """``{name: value}`` of the ``export NAME=value`` lines ``stackctl env`` prints (the
    session stack's fixture reads them the same way)."""
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


@contextlib.contextmanager
def own_stack(folder: Path, *components: str) -> Iterator[OwnStack]:
    """Start ``components`` (``kafka``; or ``mongo`` and ``girder``) in ``folder`` on
    free ports, yield them, and stop them at the end of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    _link_artifacts(folder, components)
    needed = tuple(dict.fromkeys(("mongo",) + components if "girder" in components
                                 else components))
    settings = {"GUS_STACK_DIR": str(folder)}
    settings.update({_PORT_VARIABLES[name]: str(_free_port(also_next=name == "kafka"))
                     for name in needed})
    stack = OwnStack(settings, {})
    try:
        stack.stackctl("up", *needed)
        yield OwnStack(settings, parse_exports(stack.stackctl("env", *needed).stdout))
    finally:
        subprocess.run([sys.executable, "-m", "stack.stackctl", "down", *needed],
                       cwd=REPO_ROOT, env={**os.environ, **settings}, capture_output=True,
                       timeout=120, check=False)
