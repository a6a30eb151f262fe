"""The Girder upload task: one task run per upload unit (many small files, or one big).

Retries with backoff only for transient errors (Girder down, 429, 5xx, a refused
log-in or token: never a file's failure); a retry re-runs the whole unit, which is
safe because files already in Girder are skipped by checksum. The work and the policy
live in :mod:`girder_upload_stream.loop.uploads`, shared with runs without Prefect.
No cache policy and no result persistence: inputs carry file bytes.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.ledger.units import FileOutcome, UploadUnit
from girder_upload_stream import timings
from girder_upload_stream.loop.uploads import FileUploads, find_files, is_retryable, upload_files
from girder_upload_stream.wire.codec import FileKey

__all__ = ["upload_unit", "find_in_girder"]


def _is_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False


#: The retry delays of the process (read at import: a task's policy is fixed then).
_DELAYS = timings.current().upload_retry_delays


@task(name="upload-to-girder", retries=len(_DELAYS), retry_delay_seconds=list(_DELAYS),
      retry_condition_fn=_is_transient, cache_policy=NO_CACHE, persist_result=False,
      task_run_name="upload unit {unit.unit_id} ({unit.nbytes} bytes)")
def upload_unit(unit: UploadUnit, store: GirderStore,
                files: FileUploads | None = None) -> list[FileOutcome]:
    """Upload every file of ``unit`` (:func:`~girder_upload_stream.loop.uploads.upload_files`);
    ``store`` is the flow run's (its folder cache serves every unit), ``files`` its pool
    of small-file uploads (shared by every unit, its in-flight limit adaptive); a file
    streamed into Girder while it arrived is finished by its session."""
    return upload_files(unit, store, files)


@task(name="find-in-girder", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="look up {n} re-read file(s)")
def find_in_girder(keys: list[FileKey], store: GirderStore,
                   n: int = 0) -> list[tuple[FileKey, bool | None]]:
    """After a restart: which re-read files Girder already holds (by name and sha512).
    No retries here: an unanswered key (None) is asked again by the loop later."""
    return find_files(keys, store)
