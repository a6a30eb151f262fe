"""The run's timings (girder_upload_stream/timings.py): production defaults, set from the
environment or in-process, read where they are used, and documented in one table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from girder_upload_stream import timings
from girder_upload_stream.kafka.commits import CommitBook
from girder_upload_stream.kafka.group_watch import GroupHealth, GroupState, GroupWatch
from girder_upload_stream.retry_policy import RetryPolicy
from girder_upload_stream.settings import RunSettings
from tests.unit.fakes import Clock

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_are_the_production_values():
    t = timings.Timings()
    assert t.upload_retry_delays == (2, 10, 30) == RetryPolicy().delays
    assert t.upload_retry_max_seconds == 300 == RetryPolicy().max_delay
    assert (t.ledger_retry_seconds, t.stuck_group_seconds, t.stuck_check_seconds,
            t.close_stuck_seconds, t.shutdown_grace_seconds, t.commit_patience_seconds) == (
        15, 60, 10, 20, 20, 30)
    assert timings.from_env({}) == t


def test_environment_variables_set_each_timing():
    env = {"GUS_TIMING_UPLOAD_RETRY_DELAYS": "0.5, 1", "GUS_TIMING_SHUTDOWN_GRACE_SECONDS": "3",
           "GUS_TIMING_LEDGER_RETRY_SECONDS": " ", "OTHER": "x"}
    t = timings.from_env(env)
    assert t.upload_retry_delays == (0.5, 1.0) and t.shutdown_grace_seconds == 3.0
    assert t.ledger_retry_seconds == 15.0  # blank: the default
    assert timings.from_env({"GUS_TIMING_UPLOAD_RETRY_DELAYS": ""}).upload_retry_delays == (
        2, 10, 30)


@pytest.mark.parametrize("name, text", [("UPLOAD_RETRY_DELAYS", "1,x"),
                                        ("UPLOAD_RETRY_DELAYS", "2,-1"),
                                        ("CLOSE_STUCK_SECONDS", "soon"),
                                        ("CLOSE_STUCK_SECONDS", "-1"),
                                        ("CLOSE_STUCK_SECONDS", "1,2")])
def test_a_bad_value_names_its_variable(name, text):
    with pytest.raises(ValueError, match=f"GUS_TIMING_{name}="):
        timings.from_env({f"GUS_TIMING_{name}": text})


def test_a_negative_value_is_refused_in_process_too():
    with pytest.raises(ValueError, match="shutdown_grace_seconds"):
        timings.Timings(shutdown_grace_seconds=-1)


def test_the_users_read_the_timings_in_force(timing):
    timing(upload_retry_delays=(0.1,), upload_retry_max_seconds=0.3, ledger_retry_seconds=0.5,
           commit_patience_seconds=4, stuck_group_seconds=5)
    assert RunSettings().retry_delay_seconds == 0.5
    assert RetryPolicy.current() == RetryPolicy((0.1,), 0.3)
    book = CommitBook(clock=Clock())
    assert book._patience == 4
    clock = Clock(0.0)
    watch = GroupWatch(clock=clock)
    watch.observe(GroupHealth("query-coord", "wait-join", 0))
    clock.now = 4.9
    assert watch.state is GroupState.UNSETTLED
    clock.now = 5.0
    assert watch.state is GroupState.STUCK


def test_an_override_ends_with_its_block():
    with timings.overridden(shutdown_grace_seconds=1.5) as inside:
        assert timings.current() is inside and inside.shutdown_grace_seconds == 1.5
    assert timings.current().shutdown_grace_seconds == 20.0


def _number(value: float) -> str:
    return f"{value:g}"


def test_the_docs_table_lists_every_timing_with_its_default_and_meaning():
    text = CONFIGURATION.read_text()
    table = text.split("<!-- timings-table -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(GUS_TIMING_[A-Z_]+)` \| `([^`]*)` \| (.*) \|$", table, re.MULTILINE)
    defaults = timings.Timings()
    expected = []
    for item in timings.FIELDS:
        value = getattr(defaults, item.name)
        shown = (",".join(_number(v) for v in value) if isinstance(value, tuple)
                 else _number(value))
        expected.append((timings.env_name(item.name), shown, item.metadata["doc"]))
    assert rows == expected
