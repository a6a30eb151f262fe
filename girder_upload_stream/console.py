"""The interactive console of the original program: a "." every ``update_seconds`` to
show the process is alive; ``check``/``c`` prints what was read and uploaded;
``quit``/``q`` stops gracefully. Works with stdin piped, closed or absent (under a
Prefect worker nothing is read and nothing breaks)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from girder_upload_stream.runner import request_stop

__all__ = ["Console"]


class Console:
    """A side job of the runner; reads commands in a daemon thread."""

    def __init__(self, update_seconds: float, *, interactive: bool = True,
                 stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.update_seconds = update_seconds
        self.out = stdout or sys.stdout
        self._last_dot = time.monotonic()
        self._check_requested = threading.Event()
        source = stdin if stdin is not None else sys.stdin
        if interactive and source is not None and not source.closed:
            threading.Thread(target=self._read, args=(source,), name="console",
                             daemon=True).start()

    def _read(self, source: TextIO) -> None:
        try:
            for line in source:
                command = line.strip().lower()
                if command in ("q", "quit"):
                    request_stop("quit typed on the console")
                    return
                if command in ("c", "check"):
                    self._check_requested.set()
        except (OSError, ValueError):
            return  # stdin closed or not readable: no console, nothing else changes

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except (OSError, ValueError):
            pass

    def tick(self, runner: Any, final: bool = False) -> None:
        if self._check_requested.is_set() or final:
            self._check_requested.clear()
            c = runner.processor.counters
            self._print(f"{c.messages_read} messages read ({c.bytes_read:,} bytes), "
                        f"{c.files_uploaded} files uploaded, {c.files_skipped} already in "
                        f"Girder, {c.files_failed} failed, {c.messages_rejected} messages "
                        f"rejected; {len(runner.processor.reassembler.in_progress())} file(s) "
                        "in progress")
        if time.monotonic() - self._last_dot >= self.update_seconds:
            self._last_dot = time.monotonic()
            self._print(".")
