"""The upload flow: a long-running Prefect flow that polls Kafka in micro-batches and
maps completed files, grouped into upload units, onto Girder upload tasks.

Entrypoint for deployments: ``flows/upload_stream.py:upload_stream``. This module only
sequences work; the parts live in ``girder_upload_stream``.

No ``from __future__ import annotations`` here: a served deployment pickles the flow
function by value, and Prefect must resolve its parameter types (``SecretStr``) at run
time. For the same reason the body references no module-level locks or events.
"""

import os
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr

from girder_upload_stream.artifacts import ArtifactPublisher, load_registry_fallback
from girder_upload_stream.assemble import build_runner, girder_settings, kafka_settings
from girder_upload_stream.girder_io import store_for
from girder_upload_stream.runner import reset_stop
from girder_upload_stream.settings import DEFAULT_COLLECTION_NAME, RunSettings
from girder_upload_stream.tasks.upload import find_in_girder, upload_unit
from girder_upload_stream.units import UploadUnit, close_channel, drain_channel, open_channel

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
    topic_name: str = "test",
    config: str = "local",
    girder_api_url: str | None = None,
    girder_api_key: SecretStr | None = None,
    girder_api_key_block: str | None = None,
    girder_root_folder_id: str | None = None,
    collection_name: str = DEFAULT_COLLECTION_NAME,
    girder_root_folder_path: str | None = None,
    metadata: dict[str, Any] | None = None,
    replace_existing: bool = False,
    n_threads: int = 2,
    consumer_group_id: str = "create_new",
    download_regex: str | None = None,
    output_dir: str = "GirderUploadStreamProcessor_output",
    mode: Literal["memory", "disk", "both"] = "memory",
    update_seconds: float = 300,
    max_idle_seconds: float | None = None,
    max_runtime_seconds: float | None = None,
    heartbeat_topic_name: str | None = None,
    heartbeat_program_id: str | None = None,
    heartbeat_interval_secs: float = 30,
    memory_budget_mb: int = 1024,
    stale_partial_seconds: float | None = 3600,
    interactive: bool = False,
    logs_dir: str | None = None,
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
                           heartbeat_topic_name, heartbeat_program_id, heartbeat_interval_secs)
    run = RunSettings(mode=mode, output_dir=output_dir, download_regex=download_regex,
                      update_seconds=update_seconds,
                      max_idle_seconds=max_idle_seconds, max_runtime_seconds=max_runtime_seconds,
                      memory_budget_bytes=memory_budget_mb << 20, interactive=interactive,
                      stale_partial_seconds=stale_partial_seconds or None,
                      logger_file_path=logs_dir)
    # Log in and resolve the root folder before the consumer joins the group: a wrong
    # key stops the run here, with nothing read, registered or committed.
    root_folder = store_for(girder, topic_name).check()
    log.info("consuming %s as group %s with one consumer and %d upload worker(s); "
             "uploading to %s below folder %s",
             topic_name, kafka.group_id, n_threads, girder.api_url, root_folder)
    channel = open_channel()  # files report as they land: offsets need not wait for units
    with ThreadPoolTaskRunner(max_workers=n_threads) as task_runner:
        def submit(unit: UploadUnit) -> _FutureHandle:
            unit.channel = channel
            return _FutureHandle(task_runner.submit(
                upload_unit, {"unit": unit, "girder": girder, "topic": topic_name}))

        def probe(keys: list) -> _FutureHandle:
            return _FutureHandle(task_runner.submit(
                find_in_girder, {"keys": keys, "girder": girder, "topic": topic_name,
                                 "n": len(keys)}))

        reset_stop()
        group_id = kafka.group_id
        runner = build_runner(
            run, kafka, submit, probe=probe, early_outcomes=lambda: drain_channel(channel),
            registry_fallback=lambda: load_registry_fallback(topic_name, group_id))
        # The publisher reads the recorder build_runner made, so it joins afterwards.
        runner.side_jobs.append(
            ArtifactPublisher(runner.processor.recorder, topic_name, group_id))
        try:
            summary = runner.run()
        except TerminationSignal:
            # SIGTERM or a cancellation: the runner already stopped gracefully.
            summary = runner.summary
        finally:
            close_channel(channel)
    log.info("stopped (%s) after %.1fs: %s", summary.stopped_because, summary.seconds,
             summary.counters)
    return {"stopped_because": summary.stopped_because, "seconds": summary.seconds,
            "active_seconds": summary.active_seconds,
            "group_id": kafka.group_id, **summary.counters,
            "pending_messages": summary.pending_messages}
