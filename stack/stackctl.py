"""Start, stop and inspect the local development stack.

Usage: ``python3 -m stack.stackctl {install,up,down,status,env} [component ...]``
(the Makefile's ``stack-*`` targets call this). Components, in start order:

* ``kafka``  - Apache Kafka 4.x, single-node KRaft, assembled from Maven Central;
* ``mongo``  - the MongoDB-wire-protocol server Girder stores its data in;
* ``girder`` - Girder 5 REST API with a filesystem assetstore, admin user and API key;
* ``prefect`` - ``prefect server start`` with SQLite, for the UI (not in the default set:
  the project uses Prefect's ephemeral API unless ``PREFECT_API_URL`` is set);
* ``worker`` - a Prefect worker of the process work pool ``girder-upload-stream``, which
  runs the deployments of ``deployments/prefect.yaml`` (not in the default set either;
  it needs ``prefect`` running; ``make demo`` starts it, ``make prefect-down`` stops it).

Every process binds to 127.0.0.1, keeps its data, log and pid file under ``.stack/``
and is stopped by PID. ``up`` is idempotent; if a component fails to start, every
component started by that ``up`` is stopped again and the error names the log.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from types import ModuleType

from stack.common import STACK_DIR, ComponentError

__all__ = ["DEFAULT_COMPONENTS", "ALL_COMPONENTS", "main"]

DEFAULT_COMPONENTS = ("kafka", "mongo", "girder")
ALL_COMPONENTS = DEFAULT_COMPONENTS + ("prefect", "worker")
_MODULES = {"kafka": "stack.kafka", "mongo": "stack.mongo", "girder": "stack.girder",
            "prefect": "stack.prefect_server", "worker": "stack.prefect_worker"}


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _install(names: list[str]) -> None:
    for name in names:
        started = time.monotonic()
        _load(name).install()
        print(f"[stack] {name}: installed ({time.monotonic() - started:.1f}s)", flush=True)


def _state(name: str) -> tuple[bool, str]:
    """(running?, one status line prefixed with the component's name)."""
    line = _load(name).status().strip()
    text = line.split(":", 1)[1].strip() if line.startswith(f"{name}:") else line
    return text.startswith("running"), f"{name}: {text}"


def _up(names: list[str]) -> int:
    """Install and start components in order; undo this call's starts on failure."""
    _install(names)
    started_here: list[ModuleType] = []
    for name in names:
        module = _load(name)
        was_running = _state(name)[0]
        begin = time.monotonic()
        try:
            module.start()
        except (ComponentError, OSError) as exc:
            print(f"[stack] {name} FAILED to start: {exc}", file=sys.stderr, flush=True)
            for other in reversed(started_here + [module]):
                other.stop()
            print("[stack] stopped the components this run had started", file=sys.stderr)
            return 1
        if not was_running:
            started_here.append(module)
        print(f"[stack] {name}: up ({time.monotonic() - begin:.1f}s)", flush=True)
    _write_env_file()
    return 0


def _down(names: list[str]) -> int:
    for name in reversed(names):
        _load(name).stop()
        print(f"[stack] {name}: stopped", flush=True)
    return 0


def _status(names: list[str]) -> int:
    all_up = True
    for name in names:
        running, line = _state(name)
        all_up &= running
        print(line)
    return 0 if all_up else 3


def _env_lines(names: list[str]) -> list[str]:
    env: dict[str, str] = {}
    for name in names:
        env.update(_load(name).env())
    return [f"export {key}={shlex.quote(value)}" for key, value in env.items()]


def _write_env_file() -> None:
    """Keep a sourceable copy of the stack's environment next to its data."""
    (STACK_DIR / "env.sh").write_text("\n".join(_env_lines(list(DEFAULT_COMPONENTS))) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stackctl", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "up", "down", "status", "env"])
    parser.add_argument("components", nargs="*", metavar="component",
                        help=f"any of {', '.join(ALL_COMPONENTS)}; "
                             f"default: {' '.join(DEFAULT_COMPONENTS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.components) - set(ALL_COMPONENTS))
    if unknown:
        parser.error(f"unknown component(s): {', '.join(unknown)}")
    names = args.components or list(DEFAULT_COMPONENTS)
    try:
        if args.action == "install":
            _install(names)
            return 0
        if args.action == "env":
            print("\n".join(_env_lines(names)))
            return 0
        return {"up": _up, "down": _down, "status": _status}[args.action](names)
    except ComponentError as exc:
        print(f"[stack] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
