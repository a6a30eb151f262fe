"""Named crash points for fault-injection tests: kill this process, for real, at an exact
step of the commit order.

``GUS_FAILPOINTS="upload.mid=3,commit.before=1"`` makes the 3rd pass through
``hit("upload.mid")`` (or the 1st through ``commit.before``) send SIGKILL to the process
itself: no ``finally`` block, no atexit handler, no flush runs, exactly as when the
machine loses power or the kernel's OOM killer strikes. Unset (the normal case), ``hit``
costs one dictionary lookup.

The points (see :mod:`girder_upload_stream.ledger.offsets` for the order they probe):

* ``chunk.added``   -- a chunk of a file still incomplete was stored (mid-file)
* ``upload.mid``    -- a Girder item was created, its file not uploaded yet (mid-upload)
* ``upload.done``   -- a unit's uploads returned, their offsets not settled yet
* ``commit.before`` -- the registries were saved, the offsets not committed yet (mid-commit)
* ``commit.after``  -- the broker accepted a commit
* ``stream.sent``   -- a block of a streamed file reached Girder, its upload unfinished
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["ENV_VAR", "POINTS", "hit", "configure"]

ENV_VAR = "GUS_FAILPOINTS"
POINTS = frozenset({"chunk.added", "upload.mid", "upload.done", "commit.before",
                    "commit.after", "stream.sent"})
logger = logging.getLogger(__name__)
_lock = threading.Lock()
_remaining: dict[str, int] = {}


def configure(spec: str | None) -> dict[str, int]:
    """Arm the points named in ``spec`` (``name=count,...``); returns what was armed.

    An unknown name or a count below 1 raises ValueError, so a typo in a test cannot
    silently arm nothing."""
    armed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, _, count = part.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV_VAR}: unknown point {name!r} (known: {sorted(POINTS)})")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV_VAR}: {name} needs a count >= 1, got {count!r}")
        armed[name] = int(count)
    with _lock:
        _remaining.clear()
        _remaining.update(armed)
    return armed


def hit(name: str) -> None:
    """Pass crash point ``name``; SIGKILL this process if it is armed and due."""
    if not _remaining:
        return
    with _lock:
        left = _remaining.get(name)
        if left is None:
            return
        _remaining[name] = left - 1
        if left > 1:
            return
    logger.warning("failpoint %s reached: killing process %d", name, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


configure(os.environ.get(ENV_VAR))
