"""The upload flow: a long-running Prefect flow that polls Kafka in micro-batches and
maps completed files, grouped into upload units, onto Girder upload tasks.

Entrypoint for deployments: ``flows/upload_stream.py:upload_stream``. The run's steps
are :func:`girder_upload_stream.loop.session.run_session`'s (shared with the commands'
runs without a Prefect API); this module gives it the Prefect parts: upload units as
task runs, the run logger, artifacts and the registry fallback read from them. When
the command line calls the flow, its run is consuming already (it does not wait for
Prefect's import): the flow run then gives that run these parts and returns its
summary (:mod:`girder_upload_stream.prefect_glue.late_flow_run`).

No ``from __future__ import annotations`` here: a served deployment pickles the flow
function by value, and Prefect must resolve its parameter types (``SecretStr``) at run
time. For the same reason the body references no module-level locks or events.
"""

import contextvars
import os
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from pydantic import SecretStr

from girder_upload_stream import startup
from girder_upload_stream.loop.session import Hooks, girder_settings_from, run_session
from girder_upload_stream.options import DEFAULTS
from girder_upload_stream.prefect_glue.artifacts import (ArtifactPublisher, load_registry_fallback,
                                                         publish_to_prefect)
from girder_upload_stream.prefect_glue.late_flow_run import (PrefectParts, flow_run_api_log,
                                                             take_waiting_run)
from girder_upload_stream.tasks.upload import PrefectUploads

__all__ = ["upload_stream"]


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
    progress_seconds: float = DEFAULTS.progress_seconds,
    upload_linger_seconds: float = DEFAULTS.upload_linger_seconds,
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
    max_files_in_progress: int = DEFAULTS.max_files_in_progress,
    dead_letter_topic: str | None = DEFAULTS.dead_letter_topic,
    max_parallel_uploads: int = DEFAULTS.max_parallel_uploads,
    rekey_by_file: bool = DEFAULTS.rekey_by_file,
) -> dict[str, Any]:
    """Consume chunk messages from ``topic_name``, rebuild files and upload them to Girder.

    The Girder API key comes from ``girder_api_key``, else the Prefect Secret block named
    ``girder_api_key_block``, else the ``GIRDER_API_KEY`` environment variable. Stops on
    ``max_idle_seconds`` / ``max_runtime_seconds``, SIGINT/SIGTERM, cancellation or ``q``.
    Fails at once, before anything is consumed, when Girder refuses the key, cannot be
    reached or the root folder does not resolve (``GirderStartupError``).
    """
    startup.mark("flow run started")
    params = dict(locals())
    params["girder_api_url"] = girder_api_url or os.environ.get("GIRDER_API_URL")
    waiting = take_waiting_run(params["girder_api_url"], topic_name)
    if waiting is not None:  # the command line's run, consuming already: record it
        return waiting.attach(_prefect_parts())
    girder = girder_settings_from(params, _api_key(girder_api_key, girder_api_key_block))
    hooks = Hooks(log=get_run_logger(), uploads=PrefectUploads,
                  registry_fallback=load_registry_fallback, side_job=ArtifactPublisher,
                  interruptions=(TerminationSignal,))
    return run_session(params, girder, hooks)


def _prefect_parts() -> PrefectParts:
    """What a run started by the command line before this flow run gets from it
    (prefect_glue/late_flow_run.py): called in the flow run, whose context it copies."""
    log = get_run_logger()
    return PrefectParts(contextvars.copy_context(), log, PrefectUploads, ArtifactPublisher,
                        registry_fallback=load_registry_fallback, publish=publish_to_prefect,
                        api_log=flow_run_api_log(log))
