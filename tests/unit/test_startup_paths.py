"""Unit tests of the start-up pieces of issue 14: the timeline, which way the commands
run (a Prefect API configured or not), and the plain upload runner, which runs a unit
once as the Prefect task does."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from girder_upload_stream import startup
from girder_upload_stream.cli import prefect_mode
from girder_upload_stream.girder.errors import GirderTerminalError
from girder_upload_stream.girder.store import GirderTransientError
from girder_upload_stream.shared_types import Outcome
from girder_upload_stream.loop.executor import ThreadUploads
from tests.unit.test_upload_task import FakeStore, _unit


def test_the_timeline_keeps_the_first_mark_of_each_name_in_order():
    timeline = startup.Timeline()
    assert timeline.mark("a") and timeline.mark("b") and not timeline.mark("a")
    marks = timeline.marks()
    assert list(marks) == ["a", "b"] and 0 < marks["a"] <= marks["b"]
    assert timeline.describe().startswith("a at ")


def test_the_process_age_counts_from_the_process_start_not_the_import():
    # pytest ran for a while before this test: the age is more than this test's time.
    t0 = time.monotonic()
    assert startup.process_age() > time.monotonic() - t0
    assert startup.process_age() < 24 * 3600


@pytest.fixture
def no_prefect_sources(tmp_path, monkeypatch):
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_no_prefect_api_anywhere_means_no_prefect_import(no_prefect_sources, monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect.settings", None)  # importing it would fail
    assert prefect_mode.prefect_api_url() is None


def test_the_environment_names_the_api(no_prefect_sources, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://p:4200/api")
    assert prefect_mode.prefect_api_url() == "http://p:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", " ")
    assert prefect_mode.prefect_api_url() is None


def test_a_profile_that_names_an_api_is_asked_through_prefect(no_prefect_sources):
    home = no_prefect_sources / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "lab"\n[profiles.lab]\nPREFECT_API_URL = "http://lab:4200/api"\n')
    assert prefect_mode.prefect_api_url() == "http://lab:4200/api"


class FlakyStore(FakeStore):
    """Fails every upload ``times`` times with ``kind``, then uploads."""

    def __init__(self, times: int, kind=GirderTransientError) -> None:
        super().__init__(set(), "upload file: HTTP 503: busy", kind)
        self.times = times

    def upload(self, completed, shared=False, known_there=False, folders_shared=None):
        if self.times > 0:
            self.times -= 1
            self.tried.append(completed.rel_path)
            raise self.kind(self.error, rel_path=completed.rel_path)
        return super().upload(completed, shared)


def test_neither_way_of_running_retries_by_itself():
    """The Prefect task and the plain threads run a unit once: the ledger retries, by
    the one policy (tests/unit/test_retry_policy.py)."""
    from girder_upload_stream.tasks.upload import find_in_girder, upload_unit
    assert upload_unit.retries == 0 and find_in_girder.retries == 0
    store = FlakyStore(times=1)
    with ThreadUploads(1) as uploads:
        future = uploads.submit_upload(_unit(["a.bin"]), store)
        with pytest.raises(GirderTransientError):
            future.result(timeout=10)
    assert len(store.tried) == 1
    with ThreadUploads(1) as uploads:  # the next attempt, as the ledger starts it
        outcomes = uploads.submit_upload(_unit(["a.bin"]), store).result(timeout=10)
    assert [o.rel_path for o in outcomes] == ["a.bin"] and len(store.tried) == 2


def test_a_terminal_error_raised_for_a_file_is_its_outcome_not_a_retry():
    store = FlakyStore(times=1, kind=GirderTerminalError)
    with ThreadUploads(1) as uploads:
        [outcome] = uploads.submit_upload(_unit(["a.bin"]), store).result(timeout=10)
    assert outcome.outcome is Outcome.FAILED_TERMINAL and "HTTP 503" in outcome.reason
    assert len(store.tried) == 1


def test_leaving_the_plain_runner_cancels_what_has_not_started():
    started = threading.Event()
    release = threading.Event()

    class BlockingStore(FakeStore):
        def upload(self, completed, shared=False, known_there=False, folders_shared=None):
            started.set()
            release.wait(10)
            return super().upload(completed, shared)

    store = BlockingStore(set(), "")
    uploads = ThreadUploads(1)
    with uploads:
        first = uploads.submit_upload(_unit(["a.bin"]), store)
        second = uploads.submit_upload(_unit(["b.bin"]), store)
        assert started.wait(10)
        threading.Timer(0.3, release.set).start()  # once the exit below has begun
    assert len(first.result(timeout=0)) == 1  # the running unit was waited for
    assert second.cancelled() and store.tried == ["a.bin"]
