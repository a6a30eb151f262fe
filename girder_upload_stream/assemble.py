"""Build the consumer's parts from its options: settings models, reassembler,
processor, consumer group and side jobs. Shared by the Prefect flow and the CLI, and
free of Prefect imports so it is unit-testable."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from girder_upload_stream.config import load_config
from girder_upload_stream.config_files import resolve_config_path
from girder_upload_stream.console import Console
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.heartbeat import Heartbeats
from girder_upload_stream.kafka_io import ConsumerGroup, HeartbeatProducer
from girder_upload_stream.pipeline import StreamProcessor
from girder_upload_stream.reassembly import Reassembler
from girder_upload_stream.recording import RegistryRecorder, RegistrySaver
from girder_upload_stream.runner import SideJob, StreamRunner
from girder_upload_stream.settings import (GirderSettings, KafkaCryptoSettings, KafkaSettings,
                                           RunSettings)

__all__ = ["kafka_settings", "build_runner"]

logger = logging.getLogger(__name__)


def kafka_settings(config: str, topic: str, group_id: str, n_threads: int,
                   heartbeat_topic: str | None = None, heartbeat_program_id: str | None = None,
                   heartbeat_interval_secs: float = 30.0, *,
                   treat_undecryptable_as_plaintext: bool = False,
                   max_wait_per_decrypt: float = 5.0,
                   max_initial_wait_per_decrypt: float = 60.0) -> KafkaSettings:
    """Read the config file (a path or a bundled name) into typed Kafka settings; a
    ``[kafkacrypto]`` section makes the topic an encrypted one (the three decrypt
    options only matter then)."""
    file_config = load_config(resolve_config_path(config))
    crypto = None
    if file_config.uses_kafkacrypto:
        from girder_upload_stream.kafka_crypto import node_dirs
        crypto = KafkaCryptoSettings(
            config_file=file_config.kafkacrypto_node_config(node_dirs()),
            broker=file_config.section("broker"),
            treat_undecryptable_as_plaintext=treat_undecryptable_as_plaintext,
            max_wait_per_decrypt=max_wait_per_decrypt,
            max_initial_wait_per_decrypt=max_initial_wait_per_decrypt)
        logger.info("%s is encrypted with KafkaCrypto: node store %s", topic,
                    crypto.config_file)
    if not file_config.auto_commit_disabled:
        logger.warning("enable.auto.commit is not False in the [consumer] section of %s; "
                       "girder-upload-stream turns it off anyway and commits offsets itself, "
                       "after files are durable", file_config.path)
    consumer = file_config.consumer_settings(group_id)
    consumer.setdefault("auto.offset.reset", "earliest")
    # Big fetches keep the single polling thread fed: an A/B on 8 x 256 MiB in disk mode
    # ran 25% slower with librdkafka's 1 MiB per partition and a 32 MiB queue.
    consumer.setdefault("fetch.message.max.bytes", str(16 << 20))
    # A consumer that was killed never leaves its group: the broker hands its partitions
    # to the restarted program only when its session expires. The loop never blocks (and
    # librdkafka heartbeats from its own thread), so a 10 s session is safe and a
    # restart after a crash resumes in seconds instead of librdkafka's 45.
    consumer.setdefault("session.timeout.ms", "10000")
    consumer.setdefault("heartbeat.interval.ms", "3000")
    heartbeat = (file_config.heartbeat_producer_settings() if heartbeat_topic else {})
    return KafkaSettings(topic=topic, group_id=consumer["group.id"], consumer=consumer,
                         n_threads=n_threads, heartbeat_topic=heartbeat_topic,
                         heartbeat_program_id=heartbeat_program_id or f"girder-upload-stream-{consumer['group.id']}",
                         heartbeat_interval_secs=heartbeat_interval_secs,
                         heartbeat_producer=heartbeat, kafkacrypto=crypto)


def girder_settings(api_url: str | None, api_key: SecretStr | str | None, **options: Any
                    ) -> GirderSettings:
    if not api_url:
        raise ConfigError("no Girder API URL: pass girder_api_url (or set GIRDER_API_URL)")
    if not api_key:
        raise ConfigError("no Girder API key: pass it, set GIRDER_API_KEY, or name a "
                          "Prefect Secret block")
    return GirderSettings(api_url=api_url, api_key=api_key, **options)


def build_runner(run: RunSettings, kafka: KafkaSettings, submit: Any,
                 extra_jobs: list[SideJob] | None = None, probe: Any = None,
                 early_outcomes: Any = None,
                 registry_fallback: Callable[[], set[tuple[str, str]]] | None = None
                 ) -> StreamRunner:
    """Wire a :class:`StreamRunner`; ``submit(unit)`` starts one upload unit and
    ``probe(file_keys)`` a lookup of re-read files in Girder (None: no lookups);
    ``early_outcomes()`` drains the per-file outcomes of units still running.

    ``registry_fallback`` is asked for the (rel_path, generation) of processed files
    only when the logs folder holds no registry of this topic and group (e.g. a
    restart on another machine); the flow passes the latest Prefect artifact's rows."""
    output_dir = Path(run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recorder = RegistryRecorder(Path(run.logs_dir), kafka.topic, kafka.group_id)
    known_done = recorder.processed_keys()
    if not recorder.had_local_state and registry_fallback is not None:
        try:
            fallback = registry_fallback() or set()
        except Exception as exc:  # noqa: BLE001 - Kafka offsets and Girder still suffice
            logger.warning("no local registry and the fallback failed: %s", exc)
            fallback = set()
        logger.info("no local registry of %s/%s: %d processed file(s) taken from the "
                    "fallback", kafka.topic, kafka.group_id, len(fallback))
        known_done |= fallback
    reassembler = Reassembler(run.mode, output_dir, run.max_file_bytes)
    processor = StreamProcessor(
        reassembler, download_regex=re.compile(run.download_regex) if run.download_regex else None,
        recorder=recorder, max_unit_files=run.max_unit_files,
        max_unit_bytes=run.max_unit_bytes, retry_delay=run.retry_delay_seconds,
        known_done=known_done, known_pending=recorder.pending_keys(),
        stale_partial_seconds=run.stale_partial_seconds,
        max_inflight_units=kafka.n_threads)  # the flow runs n_threads upload tasks
    jobs: list[SideJob] = [Console(run.update_seconds, interactive=run.interactive),
                           RegistrySaver(recorder, run.registry_interval_seconds)]
    if kafka.heartbeat_topic:
        producer = HeartbeatProducer(kafka.heartbeat_producer, kafka.heartbeat_topic,
                                     kafka.heartbeat_program_id)
        jobs.append(Heartbeats(producer, kafka.heartbeat_interval_secs))
    jobs += extra_jobs or []
    holder: dict[str, StreamRunner] = {}
    group = ConsumerGroup(kafka.consumer, kafka.topic,
                          on_revoke=lambda tps: holder["runner"].on_revoke(tps),
                          on_assign=processor.assigned, kafkacrypto=kafka.kafkacrypto,
                          recorder=recorder)
    runner = StreamRunner(run, processor, group, submit, jobs, before_commit=recorder.save,
                          probe=probe, early_outcomes=early_outcomes)
    holder["runner"] = runner
    return runner
