"""A progress line for people watching a long run: files and bytes done, the consumer's
lag and the recent rate, written to standard error every ``--progress_seconds``.

Why standard error and whole lines: OpenMSIStream 1.8.8's output that scripts read
(its start, ``check`` and shutdown lines, our "." alive line and the final summary) is
left exactly as it was, and the progress line never lands among the lines of standard
output. Our log lines share standard error, so a line redrawn in place with a carriage
return would be torn apart by the next log line; a whole line every interval stays
readable in a terminal, a ``journalctl`` or a worker's log alike. It starts with
``progress:`` so that a reader (or ``grep -v``) can tell it from everything else.

Pure: the loop's counters, its files in progress and the group's lag come in, text goes
out; :class:`ProgressLine` is the runner's side job that writes it. The line ends with
each hop's partitions held by this member and their lag (loop/group_view.py), so that
the members of one group can be told apart.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from girder_upload_stream.loop.group_view import HopView, format_hops, hop_views

__all__ = ["ProgressSample", "Rates", "rates_between", "format_progress", "take_sample",
           "ProgressLine"]


@dataclass(frozen=True)
class ProgressSample:
    """What the line reports, at clock time ``at`` (seconds, monotonic)."""

    at: float
    files_done: int       # in Girder: uploaded, found identical there, or found after a restart
    bytes_done: int       # message bytes of those files
    files_failed: int
    files_in_progress: int
    lag: int | None       # messages between the consumer's position and the end; None: unknown
    files_not_matched: int = 0  # skipped by --download_regex
    hops: tuple[HopView, ...] = ()  # this member's partitions and lag on each hop


@dataclass(frozen=True)
class Rates:
    """Files and bytes done per second over ``seconds``."""

    files_per_second: float
    bytes_per_second: float
    seconds: float


def rates_between(before: ProgressSample, after: ProgressSample) -> Rates | None:
    """The rate from ``before`` to ``after``; None when no time passed between them.
    Counts that went down (they never should) count as no progress, not negative."""
    seconds = after.at - before.at
    if seconds <= 0:
        return None
    return Rates(max(0, after.files_done - before.files_done) / seconds,
                 max(0, after.bytes_done - before.bytes_done) / seconds, seconds)


def _size(n_bytes: float) -> str:
    """Bytes in binary units with three significant digits at most (``1.50 GiB``)."""
    value, unit = float(n_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 \
        else f"{value:.0f} {unit}"


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress(sample: ProgressSample, rates: Rates | None, elapsed: float) -> str:
    """One line, e.g. ``progress: 0:10:00 up; 1,200 files done (300 MiB), 0 failed, 3 in
    progress; lag 12 messages; 2.0 files/s, 512 KiB/s over the last 30 s``; with
    ``, 5 skipped by --download_regex`` after "in progress" once the regex skipped any,
    and each hop's partitions and lag at the end (``; hop source: group g, partitions
    0,2 lag 0/15``)."""
    regex = (f", {sample.files_not_matched:,} skipped by --download_regex"
             if sample.files_not_matched else "")
    lag = "lag unknown" if sample.lag is None else \
        f"lag {sample.lag:,} message{'' if sample.lag == 1 else 's'}"
    rate = ("rate not known yet" if rates is None else
            f"{rates.files_per_second:.1f} files/s, {_size(rates.bytes_per_second)}/s over "
            f"the last {rates.seconds:.0f} s")
    return (f"progress: {_duration(elapsed)} up; {sample.files_done:,} file"
            f"{'' if sample.files_done == 1 else 's'} done ({_size(sample.bytes_done)}), "
            f"{sample.files_failed:,} failed, {sample.files_in_progress:,} in progress"
            f"{regex}; {lag}; {rate}"
            + (f"; {format_hops(sample.hops)}" if sample.hops else ""))


def _lag(group: Any) -> int | None:
    method = getattr(group, "lag", None)
    try:
        value = method() if callable(method) else None
    except Exception:  # noqa: BLE001 - the lag is informative only
        return None
    return value if isinstance(value, int) and value >= 0 else None


def take_sample(runner: Any, at: float) -> ProgressSample:
    """The runner's counters, files in progress, group lag and hops now."""
    c = runner.processor.counters
    return ProgressSample(at, c.files_uploaded + c.files_skipped + c.files_skipped_different
                          + c.files_found_in_girder, c.bytes_processed, c.files_failed,
                          len(runner.processor.reassembler.in_progress()), _lag(runner.group),
                          c.files_skipped_by_regex, tuple(hop_views(runner)))


class ProgressLine:
    """Runner side job: a :func:`format_progress` line on ``stream`` (standard error)
    every ``interval_seconds``, and a last one at shutdown; ``interval_seconds`` 0 or
    None turns it off. The rate is the one since the previous line. A stream that
    cannot be written to (closed, a broken pipe) is given up silently: the run goes on."""

    def __init__(self, interval_seconds: float | None, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval_seconds if interval_seconds and interval_seconds > 0 else None
        self._stream, self._clock = stream, clock
        self._started = self._last_at = clock()
        self._last: ProgressSample | None = None
        self.lines = 0  # written, for tests

    def tick(self, runner: Any, final: bool = False) -> None:
        if self.interval is None:
            return
        now = self._clock()
        if not final and now - self._last_at < self.interval:
            return
        self._last_at = now
        sample = take_sample(runner, now)
        previous = self._last or ProgressSample(self._started, 0, 0, 0, 0, None)
        self._last = sample
        self._write(format_progress(sample, rates_between(previous, sample),
                                    now - self._started))

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        try:
            print(line, file=stream, flush=True)
        except (OSError, ValueError):
            self.interval = None  # nowhere to write: stop trying
            return
        self.lines += 1
