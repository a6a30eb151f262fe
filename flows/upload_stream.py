"""The upload flow: a long-running Prefect flow that polls Kafka in micro-batches and
maps completed files, grouped into upload units, onto Girder upload tasks.

Entrypoint for deployments: ``flows/upload_stream.py:upload_stream``. This module only
sequences work; the parts live in ``girder_upload_stream``.

No ``from __future__ import annotations`` here: a served deployment pickles the flow
function by value, and Prefect must resolve its parameter types (``SecretStr``) at run
time. For the same reason the body references no module-level locks or events.
"""

import os
from contextlib import nullcontext
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr

from girder_upload_stream.prefect_glue.artifacts import ArtifactPublisher, load_registry_fallback
from girder_upload_stream.loop.wiring import (build_runner, girder_settings, kafka_settings,
                                           log_topic_settings)
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.girder.streaming import StreamingUploads
from girder_upload_stream.loop.runner import StopSignal, stop_on_signals
from girder_upload_stream.options import DEFAULTS
from girder_upload_stream.settings import RunSettings
from girder_upload_stream.tasks.upload import find_in_girder, upload_unit
from girder_upload_stream.ledger.units import UploadChannel, UploadUnit

__all__ = ["upload_stream"]


class _FutureHandle:
    """Checks a Prefect future without a round trip to the API on every poll."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.wrapped_future.done()

    def result(self) -> Any:
        return self.future.result(raise_on_failure=True)


def _api_key(key: SecretStr | None, block: str | None) -> SecretStr | None:
    if key is not None:
        return key
    if block:
        from prefect.blocks.system import Secret
        return SecretStr(str(Secret.load(block).get()))
    return SecretStr(os.environ["GIRDER_API_KEY"]) if os.environ.get("GIRDER_API_KEY") else None


@flow(name="girder-upload-stream", log_prints=False)
def upload_stream(
    topic_name: str = DEFAULTS.topic_name,
    config: str = "local",
    girder_api_url: str | None = None,
    girder_api_key: SecretStr | None = None,
    girder_api_key_block: str | None = None,
    girder_root_folder_id: str | None = DEFAULTS.girder_root_folder_id,
    collection_name: str = DEFAULTS.collection_name,
    girder_root_folder_path: str | None = DEFAULTS.girder_root_folder_path,
    metadata: dict[str, Any] | None = DEFAULTS.metadata,
    replace_existing: bool = DEFAULTS.replace_existing,
    n_threads: int = DEFAULTS.n_threads,
    consumer_group_id: str = DEFAULTS.consumer_group_id,
    download_regex: str | None = DEFAULTS.download_regex,
    output_dir: str = DEFAULTS.output_dir,
    mode: Literal["memory", "disk", "both"] = DEFAULTS.mode,
    update_seconds: float = DEFAULTS.update_seconds,
    max_idle_seconds: float | None = DEFAULTS.max_idle_seconds,
    max_runtime_seconds: float | None = DEFAULTS.max_runtime_seconds,
    heartbeat_topic_name: str | None = DEFAULTS.heartbeat_topic_name,
    heartbeat_program_id: str | None = DEFAULTS.heartbeat_program_id,
    heartbeat_interval_secs: float = DEFAULTS.heartbeat_interval_secs,
    log_topic_name: str | None = DEFAULTS.log_topic_name,
    log_program_id: str | None = DEFAULTS.log_program_id,
    log_interval_secs: float = DEFAULTS.log_interval_secs,
    treat_undecryptable_as_plaintext: bool = DEFAULTS.treat_undecryptable_as_plaintext,
    max_wait_per_decrypt: float = DEFAULTS.max_wait_per_decrypt,
    max_initial_wait_per_decrypt: float = DEFAULTS.max_initial_wait_per_decrypt,
    memory_budget_mb: int = DEFAULTS.memory_budget_mb,
    stream_min_mb: int = DEFAULTS.stream_min_mb,
    max_file_size_mb: int = DEFAULTS.max_file_size_mb,
    stale_partial_seconds: float | None = DEFAULTS.stale_partial_seconds,
    interactive: bool = False,
    logs_dir: str | None = DEFAULTS.logs_dir,
) -> dict[str, Any]:
    """Consume chunk messages from ``topic_name``, rebuild files and upload them to Girder.

    The Girder API key comes from ``girder_api_key``, else the Prefect Secret block named
    ``girder_api_key_block``, else the ``GIRDER_API_KEY`` environment variable. Stops on
    ``max_idle_seconds`` / ``max_runtime_seconds``, SIGINT/SIGTERM, cancellation or ``q``.
    Fails at once, before anything is consumed, when Girder refuses the key, cannot be
    reached or the root folder does not resolve (``GirderStartupError``).
    """
    log = get_run_logger()
    girder = girder_settings(girder_api_url or os.environ.get("GIRDER_API_URL"),
                             _api_key(girder_api_key, girder_api_key_block),
                             root_folder_id=girder_root_folder_id,
                             collection_name=collection_name,
                             root_folder_path=girder_root_folder_path,
                             metadata=metadata or {}, replace_existing=replace_existing)
    kafka = kafka_settings(config, topic_name, consumer_group_id, n_threads,
                           heartbeat_topic_name, heartbeat_program_id, heartbeat_interval_secs,
                           treat_undecryptable_as_plaintext=treat_undecryptable_as_plaintext,
                           max_wait_per_decrypt=max_wait_per_decrypt,
                           max_initial_wait_per_decrypt=max_initial_wait_per_decrypt)
    log_topic = log_topic_settings(config, log_topic_name, log_program_id, log_interval_secs,
                                   kafka.group_id)
    run = RunSettings(mode=mode, output_dir=output_dir, download_regex=download_regex,
                      update_seconds=update_seconds,
                      max_idle_seconds=max_idle_seconds, max_runtime_seconds=max_runtime_seconds,
                      memory_budget_bytes=memory_budget_mb << 20,
                      stream_min_bytes=(stream_min_mb << 20) if stream_min_mb else None,
                      max_file_bytes=max_file_size_mb << 20, interactive=interactive,
                      stale_partial_seconds=stale_partial_seconds or None,
                      logger_file_path=logs_dir)
    # Log in and resolve the root folder before the consumer joins the group: a wrong
    # key stops the run here, with nothing read, registered or committed.
    store = GirderStore(girder, topic_name)  # this run's: one folder cache for every unit
    root_folder = store.check()
    log.info("consuming %s as group %s with one consumer and %d upload worker(s); "
             "uploading to %s below folder %s",
             topic_name, kafka.group_id, n_threads, girder.api_url, root_folder)
    channel = UploadChannel()  # files report as they land: offsets need not wait for units
    with ThreadPoolTaskRunner(max_workers=n_threads) as task_runner:
        def submit(unit: UploadUnit) -> _FutureHandle:
            unit.channel = channel
            return _FutureHandle(task_runner.submit(
                upload_unit, {"unit": unit, "store": store}))

        def probe(keys: list) -> _FutureHandle:
            return _FutureHandle(task_runner.submit(
                find_in_girder, {"keys": keys, "store": store, "n": len(keys)}))

        stop = StopSignal()  # this run's: its console's "quit" and (CLI) its signals
        streams = StreamingUploads(store, kafka.group_id)  # big files, while they arrive
        group_id = kafka.group_id
        runner = build_runner(
            run, kafka, submit, probe=probe, early_outcomes=channel.drain,
            registry_fallback=lambda: load_registry_fallback(topic_name, group_id),
            log_topic=log_topic, secrets=[girder.api_key.get_secret_value()],
            girder_api_url=girder.api_url, stop=stop,
            open_stream=streams)
        # The publisher reads the recorder build_runner made, so it joins afterwards.
        runner.side_jobs.append(
            ArtifactPublisher(runner.processor.recorder, topic_name, group_id))
        try:
            # A command-line run stops gracefully on SIGINT/SIGTERM; a deployment run
            # keeps Prefect's own handling (a TerminationSignal, below).
            with stop_on_signals(stop) if interactive else nullcontext():
                summary = runner.run()
        except TerminationSignal:
            # SIGTERM or a cancellation: the runner already stopped gracefully.
            summary = runner.summary
        finally:
            streams.wait()
    log.info("stopped (%s) after %.1fs: %s", summary.stopped_because, summary.seconds,
             summary.counters)
    log.info("first message read at %s (epoch s); at most %d upload unit(s) in flight; "
             "%d file(s) spilled to disk over the memory budget; %d streamed upload(s), at "
             "most %d open at once",
             f"{summary.first_message_at:.3f}" if summary.first_message_at else "-",
             summary.max_uploads_in_flight, runner.processor.reassembler.spilled_files,
             streams.opened, streams.max_open)
    encrypted = {}
    if kafka.kafkacrypto is not None:  # counted by the consumer, before the pipeline
        encrypted = {"messages_not_decrypted": runner.group.not_decrypted}
    return {"stopped_because": summary.stopped_because, "seconds": summary.seconds,
            "active_seconds": summary.active_seconds,
            "group_id": kafka.group_id, **summary.counters,
            "pending_messages": summary.pending_messages,
            "registry_save_error": summary.save_error, "girder_requests": store.requests,
            "files_spilled": runner.processor.reassembler.spilled_files,
            "first_message_at": summary.first_message_at,
            "max_uploads_in_flight": summary.max_uploads_in_flight,
            "streams_opened": streams.opened, "max_streams_open": streams.max_open,
            **encrypted}
