"""The interactive console of the original program: a "." every ``update_seconds`` to
show the process is alive; ``check``/``c`` prints what was read and uploaded;
``quit``/``q`` stops gracefully. Works with stdin piped, closed or absent (under a
Prefect worker nothing is read and nothing breaks).

Besides our own lines on standard output, the lines OpenMSIStream 1.8.8's
``GirderUploadStreamProcessor`` logs at start, on ``check`` and at shutdown are logged
(logger ``girder_upload_stream.console``, level INFO) with the same wording, so that a
script reading them keeps working: what it listens to, where it writes, its counts.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from girder_upload_stream.loop.runner import StopSignal

__all__ = ["Console", "announce_start", "start_lines"]

# Named, not __name__: scripts read these lines, whatever module they come from.
logger = logging.getLogger("girder_upload_stream.console")


def start_lines(topic: str, n_threads: int, output_dir: Path, girder_api_url: str | None,
                heartbeat: tuple[str, float] | None = None,
                log: tuple[str, float] | None = None) -> list[str]:
    """OpenMSIStream's start-up lines, in its order (``heartbeat``/``log``: the topic and
    the interval of each, when configured)."""
    lines = []
    if heartbeat is not None:
        lines.append(f"Heartbeat messages will be produced to the '{heartbeat[0]}' topic "
                     f"every {float(heartbeat[1])} seconds")
    if log is not None:
        lines.append(f"log messages will be produced to the '{log[0]}' topic every "
                     f"{float(log[1])} seconds")
    lines.append(f"Log files and output will be in {output_dir}")
    if girder_api_url:
        lines.append(f"Listening to the {topic} topic for files to upload to Girder using "
                     f"the API at {girder_api_url}")
    lines.append(f"Will process files from messages in the {topic} topic using "
                 f"{n_threads} thread{'s' if n_threads > 1 else ''}")
    return lines


def announce_start(kafka: Any, output_dir: Path, girder_api_url: str | None,
                   log_topic: Any = None) -> None:
    """Log :func:`start_lines` for the consumer's settings."""
    heartbeat = ((kafka.heartbeat_topic, kafka.heartbeat_interval_secs)
                 if kafka.heartbeat_topic else None)
    log = (log_topic.topic, log_topic.interval_secs) if log_topic is not None else None
    for line in start_lines(kafka.topic, kafka.n_threads, output_dir, girder_api_url,
                            heartbeat, log):
        logger.info("%s", line)


def _files_processed(c: Any) -> int:
    # OpenMSIStream counts every file it finished without an error: uploaded, or skipped
    # because Girder holds it (or, without --replace_existing, another file of its name).
    return c.files_uploaded + c.files_skipped + c.files_skipped_different + \
        c.files_found_in_girder


def _skips(c: Any) -> str:
    """The files skipped for other reasons than being in Girder, when there are any."""
    parts = [f"{c.files_skipped_different} skipped as a different file of that name is "
             "in Girder" if c.files_skipped_different else "",
             f"{c.files_skipped_by_regex} skipped by --download_regex"
             if c.files_skipped_by_regex else ""]
    return "".join(f"; {part}" for part in parts if part)


class Console:
    """A side job of the runner; reads commands in a daemon thread."""

    def __init__(self, update_seconds: float, *, interactive: bool = True,
                 stdin: TextIO | None = None, stdout: TextIO | None = None,
                 output_dir: Path | None = None, stop: StopSignal | None = None) -> None:
        self.update_seconds = update_seconds
        self.stop = stop or StopSignal()  # the run's: "quit" asks it to stop
        self.out = stdout or sys.stdout
        self.output_dir = output_dir  # named in the shutdown line
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
                    self.stop.request("quit typed on the console")
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
                        f"in progress{_skips(c)}")
            if final:
                self._log_shutdown(c)
            else:
                logger.info("%d messages read, %d messages processed, %d files completely "
                            "processed so far", c.messages_read, c.messages_processed,
                            _files_processed(c))
        if time.monotonic() - self._last_dot >= self.update_seconds:
            self._last_dot = time.monotonic()
            self._print(".")

    def _log_shutdown(self, c: Any) -> None:
        where = f"writing to {self.output_dir} " if self.output_dir is not None else ""
        logger.info("Girder upload stream processor %sshut down", where)
        logger.info("%d total messages were consumed, %d messages were successfully "
                    "processed, and %d files were uploaded to Girder", c.messages_read,
                    c.messages_processed, _files_processed(c))
