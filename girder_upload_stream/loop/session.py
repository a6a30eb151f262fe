"""One consumer run, whoever starts it: the Prefect flow ``girder-upload-stream``
(:mod:`girder_upload_stream.flows.upload_stream`, for deployments, the UI and the
command line when a Prefect API is configured) or the command line alone, without a
Prefect API, which then imports no Prefect module and starts no API server.

The two differ only in what :class:`Hooks` gives: how upload units run (the
:class:`~girder_upload_stream.loop.executor.UploadExecutor` filled by Prefect task runs,
or by :class:`~girder_upload_stream.loop.executor.ThreadUploads`; neither retries: the
ledger does, by one policy), the run's logger, and the Prefect-only extras (artifacts, the registry
fallback read from them, Prefect's termination signal). Everything else (settings,
the Girder start-up check, the loop, the registries, the summary) is this module's, so
both ways behave alike. No Prefect import here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from girder_upload_stream import startup
from girder_upload_stream.assembly.safe_disk import STAGING_DIR
from girder_upload_stream.folder_lock import RunFolderLocks, lock_run_folders
from girder_upload_stream.registry.recording import check_registry_files
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.girder.streaming import StreamingUploads
from girder_upload_stream.ledger.units import UploadChannel, UploadUnit
from girder_upload_stream.memory_plan import plan_memory, tune_malloc
from girder_upload_stream.loop.executor import UploadExecutor
from girder_upload_stream.loop.uploads import FileUploads
from girder_upload_stream.loop.runner import SideJob, StopSignal, StreamRunner, stop_on_signals
from girder_upload_stream.loop.wiring import (build_rekey, build_runner,
                                              dead_letter_settings, girder_settings,
                                              kafka_settings, log_topic_settings,
                                              refuse_unprocessed_rekeyed,
                                              rekey_plan, rekey_wanted)
from girder_upload_stream.settings import GirderSettings, KafkaSettings, RunSettings

__all__ = ["Hooks", "Prepared", "girder_settings_from", "checked_store", "prepare",
           "run_session", "plain_hooks"]


@dataclass
class Hooks:
    """What differs between a run under Prefect and one without."""

    log: Any  # a logging.Logger or Prefect's run logger
    #: (n_threads, files=the run's FileUploads) -> the run's executor
    uploads: Callable[[int, FileUploads], UploadExecutor]
    registry_fallback: Callable[[str, str], set[tuple[str, str]]] | None = None
    side_job: Callable[[Any, str, str], SideJob] | None = None  # (recorder, topic, group)
    interruptions: tuple[type[BaseException], ...] = ()  # stop the run gracefully
    #: Completed files wait for company (``--upload_linger_seconds``) only where a unit
    #: costs a Prefect task run; on the plain pool a unit costs nothing, so none wait.
    linger: bool = True


def girder_settings_from(p: Mapping[str, Any], api_key: SecretStr | str | None
                         ) -> GirderSettings:
    """The Girder settings of a run's parameters ``p`` (the flow's parameter names)."""
    return girder_settings(p.get("girder_api_url"), api_key,
                           root_folder_id=p["girder_root_folder_id"],
                           collection_name=p["collection_name"],
                           root_folder_path=p["girder_root_folder_path"],
                           metadata=p["metadata"] or {}, replace_existing=p["replace_existing"])


def checked_store(girder: GirderSettings, topic: str) -> tuple[GirderStore, str]:
    """The run's store, logged in and its root folder resolved (``GirderStartupError``
    otherwise): done before the consumer joins the group, so that a wrong key stops
    the run with nothing read, registered or committed."""
    store = GirderStore(girder, topic)  # the run's: one folder cache for every unit
    root = store.check()
    startup.mark("Girder checked")
    return store, root


@dataclass
class Prepared:
    """What the command line made before the run: the checked store and its root
    folder, the Kafka settings (a ``create_new`` group id is drawn once) and the
    consumer group, subscribed already (None on encrypted topics: their consumer
    needs the run's registry), so that the group's join starts at once."""

    store: GirderStore
    root_folder: str
    kafka: KafkaSettings
    group: Any = None  # a ConsumerGroup, joining
    locks: RunFolderLocks | None = None  # the output (and logs) folder's, held
    rekey: Any = None  # --rekey_by_file: the first hop (group then reads the internal topic)

    def close(self) -> None:
        """Leave the group and drop the folder locks if no run took them (the run
        failed to start)."""
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.rekey is not None:
            self.rekey.close()
            self.rekey = None
        if self.locks is not None:
            self.locks.release()
            self.locks = None


def _kafka_settings(p: Mapping[str, Any]) -> KafkaSettings:
    return kafka_settings(p["config"], p["topic_name"], p["consumer_group_id"], p["n_threads"],
                          p["heartbeat_topic_name"], p["heartbeat_program_id"],
                          p["heartbeat_interval_secs"],
                          treat_undecryptable_as_plaintext=p["treat_undecryptable_as_plaintext"],
                          max_wait_per_decrypt=p["max_wait_per_decrypt"],
                          max_initial_wait_per_decrypt=p["max_initial_wait_per_decrypt"],
                          memory=plan_memory(p["memory_budget_mb"] << 20, p["n_threads"],
                                             streaming=bool(p["stream_min_mb"])))


def prepare(p: Mapping[str, Any], girder: GirderSettings) -> Prepared:
    """Check Girder (first: a wrong key must stop the run before the group is joined),
    then subscribe the run's consumer, whose join goes on while the caller does the
    rest of its start-up."""
    rekey = rekey_wanted(p["config"], p.get("rekey_by_file", False))  # refused: first
    tune_malloc()  # before the clients' threads and buffers (memory_plan.py)
    store, root = checked_store(girder, p["topic_name"])
    kafka = _kafka_settings(p)
    prepared = Prepared(store, root, kafka, locks=_check_folders(p, kafka))
    try:
        prepared.group, prepared.rekey = _hops(p, kafka, rekey)
    except BaseException:
        prepared.close()
        raise
    if prepared.group is None and kafka.kafkacrypto is None:
        from girder_upload_stream.kafka.clients import ConsumerGroup
        prepared.group = ConsumerGroup(kafka.consumer, kafka.topic)
        prepared.group.connect()
    return prepared


def _hops(p: Mapping[str, Any], kafka: KafkaSettings, rekey: bool) -> tuple[Any, Any]:
    """With ``--rekey_by_file``: the second hop's group and the first hop, both joining
    (:func:`build_rekey`). Without: ``(None, None)``, once a group that used the option
    has nothing left on its internal topic (:func:`refuse_unprocessed_rekeyed`; not on
    encrypted topics, where the option is refused)."""
    if rekey:
        return build_rekey(rekey_plan(p["config"], kafka), kafka)
    if kafka.kafkacrypto is None:
        refuse_unprocessed_rekeyed(kafka)
    return None, None


def _lock_folders(p: Mapping[str, Any]) -> RunFolderLocks:
    """One consumer per output folder (folder_lock.py): taken before the group is
    joined, so that a second consumer refused here never takes the first's partitions."""
    run = _run_settings(p)
    return lock_run_folders(Path(run.output_dir), Path(run.logs_dir))


def _check_folders(p: Mapping[str, Any], kafka: KafkaSettings) -> RunFolderLocks:
    """Before the group is joined: lock the folders, then check that the registry
    files can be read (a hand-edited one stops the start with a clear error)."""
    locks = _lock_folders(p)
    try:
        check_registry_files(Path(_run_settings(p).logs_dir), kafka.topic, kafka.group_id)
    except BaseException:
        locks.release()
        raise
    return locks


def _run_settings(p: Mapping[str, Any]) -> RunSettings:
    return RunSettings(mode=p["mode"], output_dir=p["output_dir"],
                       download_regex=p["download_regex"], update_seconds=p["update_seconds"],
                       progress_seconds=p["progress_seconds"],
                       upload_linger_seconds=p["upload_linger_seconds"],
                       max_idle_seconds=p["max_idle_seconds"],
                       max_runtime_seconds=p["max_runtime_seconds"],
                       memory_budget_bytes=p["memory_budget_mb"] << 20,
                       stream_min_bytes=(p["stream_min_mb"] << 20) if p["stream_min_mb"] else None,
                       max_file_bytes=p["max_file_size_mb"] << 20,
                       interactive=p["interactive"],
                       stale_partial_seconds=p["stale_partial_seconds"] or None,
                       logger_file_path=p["logs_dir"],
                       max_files_in_progress=p["max_files_in_progress"])


def run_session(p: Mapping[str, Any], girder: GirderSettings, hooks: Hooks,
                prepared: Prepared | None = None) -> dict[str, Any]:
    """Run one consumer with parameters ``p`` (the flow's parameter names) until it
    stops; the summary the flow returns. ``prepared``: what the caller made already
    (:func:`prepare`: the command line checks Girder before anything else and starts
    the group's join); otherwise Girder is checked here, before the group is joined."""
    topic = p["topic_name"]
    rekey = None  # --rekey_by_file: the first hop
    if prepared is None:
        wanted = rekey_wanted(p["config"], p.get("rekey_by_file", False))  # refused: first
        tune_malloc()  # as in prepare()
        girder_store, root_folder = checked_store(girder, topic)
        kafka = _kafka_settings(p)
        locks = _check_folders(p, kafka)
        try:
            group, rekey = _hops(p, kafka, wanted)
        except BaseException:
            locks.release()
            raise
    else:
        girder_store, root_folder = prepared.store, prepared.root_folder
        kafka, group, prepared.group = prepared.kafka, prepared.group, None  # taken
        rekey, prepared.rekey = prepared.rekey, None
        locks, prepared.locks = prepared.locks or _lock_folders(p), None
    try:
        return _run_locked(p, girder, hooks, girder_store, root_folder, kafka, group, rekey)
    finally:
        locks.release()  # deletes the lock file in .gus-staging/: it may then go too
        with contextlib.suppress(OSError):  # not there, or another run's folder is in it
            (Path(p["output_dir"]) / STAGING_DIR).rmdir()


def _run_locked(p: Mapping[str, Any], girder: GirderSettings, hooks: Hooks,
                girder_store: GirderStore, root_folder: str, kafka: KafkaSettings,
                group: Any, rekey: Any = None) -> dict[str, Any]:
    """:func:`run_session` once the folders are locked."""
    topic = p["topic_name"]
    log_topic = log_topic_settings(p["config"], p["log_topic_name"], p["log_program_id"],
                                   p["log_interval_secs"], kafka.group_id)
    run = _run_settings(p)
    dead_letter = dead_letter_settings(p["config"], p.get("dead_letter_topic"))
    hooks.log.info("consuming %s as group %s with one consumer and %d upload worker(s); "
                   "uploading to %s below folder %s", topic, kafka.group_id, p["n_threads"],
                   girder.api_url, root_folder)
    channel = UploadChannel()  # files report as they land: offsets need not wait for units
    group_id = kafka.group_id
    files = FileUploads(p["n_threads"], p["max_parallel_uploads"])
    with files, hooks.uploads(p["n_threads"], files=files) as uploads:
        def submit(unit: UploadUnit) -> Any:
            unit.channel = channel
            return uploads.submit_upload(unit, girder_store)

        stop = StopSignal()  # this run's: its console's "quit" and (CLI) its signals
        streams = StreamingUploads(girder_store, group_id)  # big files, while they arrive
        fallback = hooks.registry_fallback
        try:
            runner = build_runner(
                run, kafka, submit, probe=lambda keys: uploads.submit_probe(keys, girder_store),
                early_outcomes=channel.drain,
                registry_fallback=(lambda: fallback(topic, group_id)) if fallback else None,
                log_topic=log_topic, secrets=[girder.api_key.get_secret_value()],
                girder_api_url=girder.api_url, stop=stop, group=group, open_stream=streams,
                dead_letter=dead_letter, rekey=rekey)
        except BaseException:
            if group is not None:
                group.close()  # joined beforehand: leave at once
            if rekey is not None:
                rekey.close()
            raise
        if not hooks.linger:
            runner.processor.linger_seconds = 0.0
        if hooks.side_job is not None:  # it reads the recorder build_runner made
            runner.side_jobs.append(hooks.side_job(runner.processor.recorder, topic, group_id))
        try:
            # A command-line run stops gracefully on SIGINT/SIGTERM; a deployment run
            # keeps Prefect's own handling (a TerminationSignal, below).
            with stop_on_signals(stop) if p["interactive"] else nullcontext():
                summary = runner.run()
        except hooks.interruptions:
            # SIGTERM or a cancellation: the runner already stopped gracefully.
            summary = runner.summary
        finally:
            streams.wait()
    _remove_staging(runner)  # every upload has ended (the with block)
    return _summarise(hooks.log, runner, summary, kafka, girder_store, streams, files)


def _remove_staging(runner: StreamRunner) -> None:
    """Delete this run's staging folder (``.gus-staging/`` itself goes once the folder
    lock is dropped, when no other run has a folder there): a disk-mode run leaves its
    files and ``LOGS`` behind, nothing else. Only once no upload reads a staging file."""
    runner.processor.reassembler.close()


def _summarise(log: Any, runner: StreamRunner, summary: Any, kafka: KafkaSettings,
               store: GirderStore, streams: StreamingUploads, files: FileUploads
               ) -> dict[str, Any]:
    """Log how the run ended and return the flow's summary."""
    log.info("stopped (%s) after %.1fs: %s", summary.stopped_because, summary.seconds,
             summary.counters)
    spilled = runner.processor.reassembler.spilled_files
    log.info("first message read at %s (epoch s); at most %d upload unit(s) in flight; "
             "%d file(s) spilled to disk over the memory budget (%.0f MiB); %d streamed "
             "upload(s), at most %d open at once",
             f"{summary.first_message_at:.3f}" if summary.first_message_at else "-",
             summary.max_uploads_in_flight, spilled,
             runner.processor.reassembler.spilled_bytes / (1 << 20), streams.opened,
             streams.max_open)
    limit = files.gate.limit.snapshot()
    log.info("small-file uploads: at most %d in flight at once; their limit went from %d "
             "to %d at most and %d at least (%d decrease(s) for Girder errors, %d for its "
             "latency), %d now", files.gate.max_in_flight, files.initial, limit.highest,
             limit.lowest, limit.decreases_for_errors, limit.decreases_for_latency,
             limit.limit)
    encrypted = {}
    if kafka.kafkacrypto is not None:  # counted by the consumer, before the pipeline
        encrypted = {"messages_not_decrypted": runner.group.not_decrypted}
    return {"stopped_because": summary.stopped_because, "seconds": summary.seconds,
            "active_seconds": summary.active_seconds,
            "group_id": kafka.group_id, **summary.counters,
            "pending_messages": summary.pending_messages,
            "chunks_waiting_at_bound": summary.waiting_at_bound,
            "registry_save_error": summary.save_error, "girder_requests": store.requests,
            "fatal_error": str(runner.fatal) if runner.fatal is not None else None,
            "files_spilled": spilled, "first_message_at": summary.first_message_at,
            "max_uploads_in_flight": summary.max_uploads_in_flight,
            "streams_opened": streams.opened, "max_streams_open": streams.max_open,
            "max_file_uploads_in_flight": files.gate.max_in_flight,
            "file_upload_limit": {"highest": limit.highest, "lowest": limit.lowest,
                                  "last": limit.limit,
                                  "decreases_for_errors": limit.decreases_for_errors,
                                  "decreases_for_latency": limit.decreases_for_latency},
            **encrypted}


def plain_hooks(log: logging.Logger | None = None) -> Hooks:
    """The hooks of a run without Prefect: upload units on a plain thread pool."""
    from girder_upload_stream.loop.executor import ThreadUploads
    return Hooks(log=log or logging.getLogger("girder_upload_stream.run"), uploads=ThreadUploads,
                 linger=False)
