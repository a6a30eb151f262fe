"""The one interface that runs upload units and Girder lookups, and its plain filling.

A run submits two kinds of :class:`Job` (an upload unit, a lookup of re-read files) to
an :class:`UploadExecutor` and later collects each one's :class:`Handle` without
waiting. Two classes fill the interface, and both run the same bodies of
:mod:`~girder_upload_stream.loop.uploads` (:data:`BODIES`) exactly once per job:

* :class:`ThreadUploads` (here): plain threads, for runs without a Prefect API;
* ``PrefectUploads`` (``tasks/upload.py``): Prefect task runs on a
  ``ThreadPoolTaskRunner``, for runs a Prefect API records.

Neither retries: a unit that raises comes back to the ledger, which tries its files
again after :class:`~girder_upload_stream.retry_policy.RetryPolicy`'s delay, so both
ways follow one retry policy. No Prefect import here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from girder_upload_stream.ledger.units import UploadUnit
from girder_upload_stream.loop.uploads import FileUploads, find_files, upload_files
from girder_upload_stream.wire.codec import FileKey

__all__ = ["BODIES", "Handle", "Job", "UploadExecutor", "ThreadUploads"]

#: What each kind of job runs, whoever runs it.
BODIES: dict[str, Callable[..., Any]] = {"upload": upload_files, "probe": find_files}


class Handle(Protocol):
    """A submitted job: ``done()`` never blocks; ``result()`` returns its value or
    raises its error once it is done."""

    def done(self) -> bool: ...
    def result(self) -> Any: ...


@dataclass(frozen=True)
class Job:
    """One call of a body of :data:`BODIES`: ``kind`` names it, ``params`` are its
    keyword arguments, ``name`` says what it is in logs (and Prefect's UI)."""

    kind: Literal["upload", "probe"]
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def run(self) -> Any:
        """Run the body once, in this thread."""
        return BODIES[self.kind](**self.params)


class UploadExecutor(ABC):
    """Runs jobs, ``n_threads`` at once; a context manager whose exit cancels what has
    not started and waits for what is running. ``files`` is the run's pool of
    small-file uploads, shared by every unit."""

    def __init__(self, n_threads: int, files: FileUploads | None = None) -> None:
        self.n_threads = n_threads
        self.files = files

    def __enter__(self) -> UploadExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit_upload(self, unit: UploadUnit, store: Any) -> Handle:
        """Upload ``unit``'s files once; the handle's result is their outcomes."""
        return self.start(Job("upload", f"upload unit {unit.unit_id} ({unit.nbytes} bytes)",
                              {"unit": unit, "store": store, "files": self.files}))

    def submit_probe(self, keys: list[FileKey], store: Any) -> Handle:
        """Ask Girder once which of ``keys`` it holds: ``[(key, True|False|None)]``."""
        return self.start(Job("probe", f"look up {len(keys)} re-read file(s)",
                              {"keys": keys, "store": store}))

    @abstractmethod
    def start(self, job: Job) -> Handle:
        """Start ``job`` (its body run once) without waiting for it."""

    @abstractmethod
    def close(self) -> None:
        """Cancel the jobs not started, wait for the running ones."""


class ThreadUploads(UploadExecutor):
    """Jobs on ``n_threads`` plain threads (a run without Prefect)."""

    def __init__(self, n_threads: int, files: FileUploads | None = None) -> None:
        super().__init__(n_threads, files)
        self._executor = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="upload")

    def start(self, job: Job) -> Handle:
        return self._executor.submit(job.run)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
