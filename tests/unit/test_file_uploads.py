"""The run's small-file uploads (``FileUploads``, girder_upload_stream/loop/uploads.py):
a unit's small files upload side by side, never more at once than the adaptive limit
allows; failures keep the unit's rules (a 5xx for one file does not hold back the
others, an unreachable Girder stops the unit), and a failing Girder lowers the limit."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from girder_upload_stream.girder.errors import GirderUnreachableError
from girder_upload_stream.girder.store import GirderTransientError
from girder_upload_stream.shared_types import FileOutcome, Outcome
from girder_upload_stream.loop.executor import ThreadUploads
from girder_upload_stream.loop.uploads import FileUploads, upload_files
from tests.unit.test_upload_task import _unit


class SlowStore:
    """Each upload takes ``seconds``; counts how many run at once; fails the names in
    ``failing`` with ``error`` of class ``kind``."""

    def __init__(self, seconds: float = 0.05, failing: set[str] = frozenset(),
                 error: str = "upload file: HTTP 503: busy",
                 kind: type[GirderTransientError] = GirderTransientError) -> None:
        self.seconds, self.failing, self.error, self.kind = seconds, failing, error, kind
        self.running = self.most = 0
        self.order: list[str] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def upload(self, completed, shared=False, known_there=False, folders_shared=None) -> FileOutcome:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.order.append(completed.rel_path)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.seconds)
            if completed.rel_path in self.failing:
                raise self.kind(self.error, rel_path=completed.rel_path)
            return FileOutcome(completed.rel_path, completed.file_key, Outcome.UPLOADED)
        finally:
            with self._lock:
                self.running -= 1


def _names(n: int) -> list[str]:
    return [f"f{i:03d}.bin" for i in range(n)]


def test_small_files_upload_side_by_side_within_the_limit():
    store = SlowStore(0.05)
    with FileUploads(initial=2, maximum=6) as files:
        outcomes = upload_files(_unit(_names(40)), store, files)
    assert sorted(o.rel_path for o in outcomes) == _names(40)
    assert 2 < store.most <= 6       # grew past --n_threads, never past the maximum
    assert files.gate.max_in_flight == store.most
    assert all(name.startswith("girder-upload") for name in store.threads)


def test_without_a_pool_a_unit_uploads_one_file_at_a_time():
    store = SlowStore(0.01)
    outcomes = upload_files(_unit(_names(5)), store)
    assert [o.rel_path for o in outcomes] == _names(5) and store.most == 1


def test_big_files_stay_in_the_units_thread(monkeypatch):
    store = SlowStore(0.01)
    with FileUploads(initial=4, maximum=4, max_file_bytes=0) as files:  # every file "big"
        upload_files(_unit(_names(6)), store, files)
    assert store.most == 1 and store.order == _names(6)
    assert files.gate.max_in_flight == 0


def test_a_5xx_for_one_file_lets_the_others_land_then_raises_and_lowers_the_limit():
    store = SlowStore(0.01, failing={"f003.bin"})
    with FileUploads(initial=8, maximum=8) as files:
        unit = _unit(_names(10))
        with pytest.raises(GirderTransientError):
            upload_files(unit, store, files)
        assert sorted(store.order) == _names(10)
        assert files.gate.limit.snapshot().decreases_for_errors == 1
        assert files.gate.limit.limit == 4


def test_an_unreachable_girder_stops_the_unit_and_drops_its_queued_files():
    # By its class: the text says nothing the code reads.
    store = SlowStore(0.05, failing=set(_names(30)), error="upload file: refused",
                      kind=GirderUnreachableError)
    with FileUploads(initial=1, maximum=1) as files:
        with pytest.raises(GirderTransientError):
            upload_files(_unit(_names(30)), store, files)
    assert len(store.order) < 30


def test_a_file_produced_again_in_one_unit_uploads_after_its_earlier_copy():
    unit = _unit(["a.bin", "b.bin"])
    unit.files.append(replace(unit.files[0], file_hash=b"\x01" * 64))  # another generation
    store = SlowStore(0.02)
    with FileUploads(initial=4, maximum=4) as files:
        upload_files(unit, store, files)
    assert store.order.count("a.bin") == 2 and store.order[-1] == "a.bin"


def test_the_plain_runner_shares_one_pool_between_its_units():
    store = SlowStore(0.05)
    with FileUploads(initial=8, maximum=8) as files, \
            ThreadUploads(2, files=files) as uploads:
        futures = [uploads.submit_upload(_unit([f"u{u}f{i}.bin" for i in range(8)]), store)
                   for u in range(2)]
        assert all(len(f.result(timeout=30)) == 8 for f in futures)
    assert 2 < store.most <= 8


def test_both_ways_of_running_take_the_pool_as_run_session_passes_it():
    from girder_upload_stream.loop.session import plain_hooks
    store = SlowStore(0.01)
    with FileUploads(initial=2, maximum=4) as files, \
            plain_hooks().uploads(2, files=files) as uploads:
        assert len(uploads.submit_upload(_unit(_names(6)), store).result(timeout=30)) == 6
    assert files.gate.max_in_flight >= 1
    from girder_upload_stream.tasks.upload import PrefectUploads
    assert PrefectUploads(2, files=files).files is files
