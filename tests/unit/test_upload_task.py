"""Unit tests of the upload task's body (``upload_unit.fn``, no Prefect run): which
files of a unit are tried when one of them meets a transient Girder error."""

from __future__ import annotations

import pytest

from girder_upload_stream.girder.errors import GirderAuthError, GirderUnreachableError
from girder_upload_stream.girder.store import GirderTransientError
from girder_upload_stream.shared_types import FileOutcome, Outcome
from girder_upload_stream.tasks import upload as upload_task
from tests.unit.fakes import Log, encoded
from tests.unit.fakes import make_processor as make


class FakeStore:
    """Fails the files named in ``failing`` with ``error`` (of class ``kind``); uploads
    the others."""

    def __init__(self, failing: set[str], error: str, kind=GirderTransientError) -> None:
        self.failing, self.error, self.kind, self.tried = failing, error, kind, []

    def upload(self, completed, shared=False, known_there=False, folders_shared=None) -> FileOutcome:
        self.tried.append(completed.rel_path)
        if completed.rel_path in self.failing:
            raise self.kind(self.error, rel_path=completed.rel_path)
        return FileOutcome(completed.rel_path, completed.file_key, Outcome.UPLOADED)


def _unit(names: list[str]):
    log, proc = Log(), make()
    for name in names:
        proc.handle(log.put(0, *encoded(name.encode(), name)[0]))
    [unit] = proc.take_units()
    assert [f.rel_path for f in unit.files] == names
    return unit


def _run(store: FakeStore, unit):
    return upload_task.upload_unit.fn(unit, store)


def test_a_file_girder_answers_5xx_for_does_not_hold_back_the_others():
    store = FakeStore({"b.bin"}, "upload file: HTTP 503: busy")
    unit = _unit(["a.bin", "b.bin", "c.bin"])
    with pytest.raises(GirderTransientError, match="HTTP 503"):
        _run(store, unit)
    assert store.tried == ["a.bin", "b.bin", "c.bin"]  # c.bin was tried after b.bin


def test_an_unreachable_girder_stops_the_unit_at_once():
    store = FakeStore({"a.bin", "b.bin"}, "list items: refused", GirderUnreachableError)
    unit = _unit(["a.bin", "b.bin", "c.bin"])
    with pytest.raises(GirderUnreachableError):
        _run(store, unit)
    assert store.tried == ["a.bin"]


def test_a_refused_token_stops_the_unit_at_once():
    store = FakeStore({"a.bin"}, "list items: HTTP 401: token expired", GirderAuthError)
    unit = _unit(["a.bin", "b.bin"])
    with pytest.raises(GirderAuthError):
        _run(store, unit)
    assert store.tried == ["a.bin"]


def test_a_unit_without_trouble_returns_every_outcome():
    store = FakeStore(set(), "")
    outcomes = _run(store, _unit(["a.bin", "b.bin"]))
    assert [(o.rel_path, o.outcome) for o in outcomes] == [("a.bin", Outcome.UPLOADED),
                                                          ("b.bin", Outcome.UPLOADED)]
