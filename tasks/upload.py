"""The Prefect way of running upload jobs: the Girder upload task (one task run per
upload unit: many small files, or one big), the lookup task, and
:class:`PrefectUploads`, which fills the run's executor interface
(:class:`~girder_upload_stream.loop.executor.UploadExecutor`) with task runs on a
``ThreadPoolTaskRunner``.

Each task runs its body of :mod:`girder_upload_stream.loop.uploads` once, as the plain
threads do, and has no retries of its own: a unit that raises (Girder unreachable, a
refused token, a 5xx for one of its files) ends as a failed task run, and the ledger
tries its unsettled files again after the one retry policy's delay
(:mod:`girder_upload_stream.retry_policy`; files already in Girder are then skipped by
checksum). No cache policy and no result persistence: inputs carry file bytes.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.ledger.units import UploadUnit
from girder_upload_stream.shared_types import FileOutcome
from girder_upload_stream.loop.executor import Handle, Job, UploadExecutor
from girder_upload_stream.loop.uploads import FileUploads, find_files, upload_files
from girder_upload_stream.prefect_glue.task_logs import quiet_completed_task_runs
from girder_upload_stream.wire.codec import FileKey

__all__ = ["upload_unit", "find_in_girder", "PrefectUploads"]


@task(name="upload-to-girder", retries=0, cache_policy=NO_CACHE, persist_result=False,
      task_run_name="upload unit {unit.unit_id} ({unit.nbytes} bytes)")
def upload_unit(unit: UploadUnit, store: GirderStore,
                files: FileUploads | None = None) -> list[FileOutcome]:
    """Upload every file of ``unit`` once (:func:`~girder_upload_stream.loop.uploads.upload_files`);
    ``store`` is the flow run's (its folder cache serves every unit), ``files`` its pool
    of small-file uploads (shared by every unit, its in-flight limit adaptive); a file
    streamed into Girder while it arrived is finished by its session."""
    return upload_files(unit, store, files)


@task(name="find-in-girder", retries=0, cache_policy=NO_CACHE, persist_result=False,
      task_run_name="look up {n} re-read file(s)")
def find_in_girder(keys: list[FileKey], store: GirderStore,
                   n: int = 0) -> list[tuple[FileKey, bool | None]]:
    """After a restart: which re-read files Girder already holds (by name and sha512).
    An unanswered key (None) is asked again by the loop later."""
    return find_files(keys, store)


#: The task of each kind of job (the bodies of loop/executor.py's BODIES).
TASKS = {"upload": upload_unit, "probe": find_in_girder}


class _TaskHandle:
    """Checks a Prefect future without a round trip to the API on every poll."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.wrapped_future.done()

    def result(self) -> Any:
        return self.future.result(raise_on_failure=True)


class PrefectUploads(UploadExecutor):
    """Jobs as Prefect task runs on a ``ThreadPoolTaskRunner`` of ``n_threads``."""

    def __init__(self, n_threads: int, files: FileUploads | None = None) -> None:
        super().__init__(n_threads, files)
        self._runner = ThreadPoolTaskRunner(max_workers=n_threads)
        # Fewer rows in the Prefect database per task run: no 'Finished in state Completed()'.
        self._quiet = quiet_completed_task_runs()

    def __enter__(self) -> PrefectUploads:
        self._quiet.__enter__()
        self._runner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._runner.__exit__(*exc)
        finally:
            self._quiet.__exit__(*exc)

    def start(self, job: Job) -> Handle:
        params = dict(job.params)
        if job.kind == "probe":
            params["n"] = len(params["keys"])  # for the task run's name
        return _TaskHandle(self._runner.submit(TASKS[job.kind], params))

    def close(self) -> None:
        self.__exit__(None, None, None)
