"""The Girder upload task: one task run per upload unit (many small files, or one big).

Retries with backoff only for transient errors (Girder down, 429, 5xx, a refused
log-in or token: never a file's failure); a retry re-runs the whole unit, which is
safe because files already in Girder are skipped by checksum.
No cache policy and no result persistence: inputs carry file bytes.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from girder_upload_stream.wire.codec import FileKey
from girder_upload_stream.errors import TransientError
from girder_upload_stream.girder.errors import GirderAuthError
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.ledger.units import FileOutcome, UploadUnit, is_shared, report_outcome

__all__ = ["upload_unit", "find_in_girder"]


def _is_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


@task(name="upload-to-girder", retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=_is_transient, cache_policy=NO_CACHE, persist_result=False,
      task_run_name="upload unit {unit.unit_id} ({unit.nbytes} bytes)")
def upload_unit(unit: UploadUnit, store: GirderStore) -> list[FileOutcome]:
    """Upload every file of ``unit``; terminal problems come back as outcomes, transient
    ones raise so that Prefect retries the unit. When Girder answered (a 5xx or 429 for
    one file), the unit's other files are tried first: one file Girder keeps refusing
    must not hold back the files packed with it. When Girder could not be reached, the
    error is raised at once (the other files would only wait for it too). ``store`` is
    the flow run's (its folder cache serves every unit). A file streamed into Girder
    while it arrived is finished by its session (girder/streaming.py): the rest of its
    bytes once verified, then its metadata; a retry resumes at Girder's offset."""
    outcomes = []
    deferred: TransientError | None = None
    for completed in unit.files:
        stream = unit.streams.get(completed.file_key)  # streamed while it arrived
        try:
            if stream is not None:
                outcome = stream.finish(completed, shared=lambda: is_shared(unit))
            else:
                outcome = store.upload(completed, shared=lambda: is_shared(unit))
        except TransientError as exc:
            if not _girder_answered(exc):
                raise
            deferred = deferred or exc
            continue
        report_outcome(unit, outcome)  # settles it before the unit ends
        outcomes.append(outcome)
    if deferred is not None:
        raise deferred
    return outcomes


def _girder_answered(exc: TransientError) -> bool:
    """True for an HTTP answer (5xx, 429) about one request; False for an unreachable
    Girder (connection refused or reset, a timeout: see the texts of
    girder_upload_stream/girder/errors.py) and for a refused token, which every other
    file would meet too."""
    return not isinstance(exc, GirderAuthError) and "Girder unreachable" not in exc.message


@task(name="find-in-girder", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="look up {n} re-read file(s)")
def find_in_girder(keys: list[FileKey], store: GirderStore,
                   n: int = 0) -> list[tuple[FileKey, bool | None]]:
    """After a restart: which re-read files Girder already holds (by name and sha512).
    No retries here: an unanswered key (None) is asked again by the loop later."""
    return [(key, store.holds(key[0], key[1])) for key in keys]
