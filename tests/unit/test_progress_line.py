"""The progress line (loop/progress.py): its rate and lag, its text, when it is written
and where (standard error, never the console's standard output)."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest

from girder_upload_stream.ledger.stream_types import Counters
from girder_upload_stream.loop.progress import (ProgressLine, ProgressSample, Rates,
                                                format_progress, rates_between, take_sample)
from girder_upload_stream.options import DEFAULTS, OPTIONS
from girder_upload_stream.settings import RunSettings

MIB = 1 << 20
LINE = re.compile(r"^progress: \d+:\d\d:\d\d up; [\d,]+ files? done "
                  r"\([\d.]+ (B|KiB|MiB|GiB|TiB)\), "
                  r"[\d,]+ failed, [\d,]+ in progress; (lag [\d,]+ messages?|lag unknown); "
                  r"(rate not known yet|[\d.]+ files/s, [\d.]+ (B|KiB|MiB|GiB|TiB)/s over the "
                  r"last \d+ s)$")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def runner(lag=None, in_progress: int = 0, **counts) -> SimpleNamespace:
    counters = Counters(**counts)
    reassembler = SimpleNamespace(in_progress=lambda: [object()] * in_progress)
    group = SimpleNamespace(lag=lag if callable(lag) else (lambda: lag))
    return SimpleNamespace(processor=SimpleNamespace(counters=counters, reassembler=reassembler),
                           group=group)


def sample(at: float, files: int, n_bytes: int, lag: int | None = 0) -> ProgressSample:
    return ProgressSample(at, files, n_bytes, 0, 0, lag)


# ---------------------------------------------------------------- rate and lag


def test_rate_is_files_and_bytes_done_between_two_samples() -> None:
    rates = rates_between(sample(10, 100, 25 * MIB), sample(40, 160, 40 * MIB))
    assert rates == Rates(2.0, 0.5 * MIB, 30.0)


def test_rate_of_no_elapsed_time_is_unknown() -> None:
    assert rates_between(sample(10, 1, 1), sample(10, 5, 5)) is None


def test_rate_never_negative() -> None:
    rates = rates_between(sample(0, 10, 1000), sample(10, 4, 10))
    assert rates.files_per_second == 0 and rates.bytes_per_second == 0


def test_sample_counts_every_file_in_girder_and_the_lag() -> None:
    r = runner(lag=42, in_progress=3, files_uploaded=5, files_skipped=2,
               files_found_in_girder=1, files_failed=4, bytes_processed=12345)
    assert take_sample(r, 7.0) == ProgressSample(7.0, 8, 12345, 4, 3, 42)


@pytest.mark.parametrize("lag", [None, -1, "12", lambda: 1 / 0])
def test_lag_unknown_when_the_group_cannot_say(lag) -> None:
    assert take_sample(runner(lag=lag), 0.0).lag is None


def test_group_without_lag_method() -> None:
    r = runner()
    r.group = object()
    assert take_sample(r, 0.0).lag is None


# ---------------------------------------------------------------- the text


def test_line_text() -> None:
    line = format_progress(ProgressSample(0, 1200, 300 * MIB, 0, 3, 12),
                           Rates(2.0, 512 * 1024, 30.0), 600.0)
    assert line == ("progress: 0:10:00 up; 1,200 files done (300 MiB), 0 failed, 3 in "
                    "progress; lag 12 messages; 2.0 files/s, 512 KiB/s over the last 30 s")
    assert LINE.match(line)


def test_line_text_singular_unknown_and_large() -> None:
    line = format_progress(ProgressSample(0, 1, 1536, 2, 0, None), None, 90061.0)
    assert line == ("progress: 25:01:01 up; 1 file done (1.50 KiB), 2 failed, 0 in "
                    "progress; lag unknown; rate not known yet")
    assert LINE.match(line)
    assert "lag 1 message;" in format_progress(sample(0, 0, 0, lag=1), None, 0)
    assert "(12.0 GiB)" in format_progress(sample(0, 0, 12 * 1024 * MIB), None, 0)
    assert "(999 B)" in format_progress(sample(0, 0, 999), None, 0)


# ---------------------------------------------------------------- the side job


def test_writes_a_line_every_interval_and_a_last_one() -> None:
    clock, out = Clock(), io.StringIO()
    job = ProgressLine(10, stream=out, clock=clock)
    r = runner(lag=0)
    for second in range(25):  # t = 100 .. 124: lines at 110 and 120
        r.processor.counters.files_uploaded = 2 * second
        r.processor.counters.bytes_processed = 2 * second * 1000
        job.tick(r)
        clock.now += 1
    job.tick(r, final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(LINE.match(line) for line in lines)
    assert lines[0].startswith("progress: 0:00:10 up; 20 files done")
    assert lines[0].endswith("2.0 files/s, 1.95 KiB/s over the last 10 s")
    assert lines[1].startswith("progress: 0:00:20 up; 40 files done")
    assert lines[2].startswith("progress: 0:00:25 up; 48 files done")
    assert lines[2].endswith("over the last 5 s")


def test_zero_interval_writes_nothing() -> None:
    out = io.StringIO()
    job = ProgressLine(0, stream=out, clock=Clock())
    job.tick(runner())
    job.tick(runner(), final=True)
    assert out.getvalue() == "" and job.lines == 0


def test_a_closed_stream_is_given_up_quietly() -> None:
    out = io.StringIO()
    out.close()
    clock = Clock()
    job = ProgressLine(1, stream=out, clock=clock)
    clock.now += 5
    job.tick(runner())  # no exception
    assert job.interval is None and job.lines == 0


def test_default_stream_is_standard_error(capsys) -> None:
    clock = Clock()
    job = ProgressLine(1, clock=clock)
    clock.now += 1
    job.tick(runner(lag=3))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert LINE.match(captured.err.strip())


def test_option_defined_once_for_commands_and_flow() -> None:
    option = next(o for o in OPTIONS if o.name == "progress_seconds")
    assert option.flow and option.cli and DEFAULTS.progress_seconds == 30
    assert RunSettings().progress_seconds == DEFAULTS.progress_seconds
    assert option.parse("0") == 0
    with pytest.raises(Exception):
        option.parse("-1")


def test_files_skipped_by_the_regex_are_on_the_line_once_there_are_any() -> None:
    none = take_sample(runner(files_uploaded=1), 5.0)
    assert "download_regex" not in format_progress(none, None, 5.0)
    some = take_sample(runner(files_uploaded=1, files_skipped_by_regex=4,
                              files_skipped_different=2), 5.0)
    line = format_progress(some, None, 5.0)
    assert some.files_done == 3  # a file skipped as different is settled: done
    assert "3 files done (0 B), 0 failed, 0 in progress, 4 skipped by --download_regex; " \
        in line, line
