"""The readers-writer lock that keeps a test stopping a stack component alone
(tests/integration/stack_share.py): a waiting writer lets the running readers finish,
lets no new reader in, and runs alone. flock locks belong to open files, so threads of
one process stand in for the workers of a parallel run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from tests.integration import stack_share


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GUS_TEST_RUN_DIR", str(tmp_path))


def _hold(lock: Callable[[], AbstractContextManager], log: list[str], name: str,
          release: threading.Event) -> threading.Thread:
    def body() -> None:
        with lock():
            log.append(f"{name} in")
            release.wait(30)
            log.append(f"{name} out")
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_waiting_writer_lets_readers_finish_and_no_new_reader_in():
    log: list[str] = []
    done_a, done_w, done_b = threading.Event(), threading.Event(), threading.Event()
    a = _hold(stack_share.shared, log, "A", done_a)
    _until(lambda: "A in" in log, "reader A")
    w = _hold(stack_share.alone, log, "W", done_w)
    time.sleep(0.3)  # W is blocked behind A (a wrong lock would let it in here)
    b = _hold(stack_share.shared, log, "B", done_b)
    time.sleep(0.3)  # B is blocked behind W's turnstile
    assert log == ["A in"]
    done_a.set()
    _until(lambda: "W in" in log, "the writer")
    time.sleep(0.3)
    assert log == ["A in", "A out", "W in"], "nothing beside the writer"
    done_w.set()
    _until(lambda: "B in" in log, "reader B")
    done_b.set()
    for thread in (a, w, b):
        thread.join(10)
    assert log == ["A in", "A out", "W in", "W out", "B in", "B out"]


def test_readers_share():
    log: list[str] = []
    release = threading.Event()
    threads = [_hold(stack_share.shared, log, name, release) for name in "ABC"]
    _until(lambda: len(log) == 3, "three readers at once")
    release.set()
    for thread in threads:
        thread.join(10)
