"""Build the consumer's parts from its options: settings models, reassembler,
processor, consumer group and side jobs. Shared by the Prefect flow and the CLI, and
free of Prefect imports so it is unit-testable."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from girder_upload_stream.wire.config import load_config
from girder_upload_stream.wire.config_files import resolve_config_path
from girder_upload_stream.loop.console import Console, announce_start
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.loop.heartbeat import Heartbeats
from girder_upload_stream.kafka.clients import ConsumerGroup, HeartbeatProducer, LogProducer
from girder_upload_stream.kafka.side_producers import DeadLetterProducer, fetch_messages
from girder_upload_stream.loop.dead_letter import DeadLetters
from girder_upload_stream.loop.log_topic import LogBuffer, LogMessages, LogTopic, split_log_section
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.memory_plan import MemoryPlan, plan_memory
from girder_upload_stream.loop.progress import ProgressLine
from girder_upload_stream.assembly.reassembly import Reassembler, reserved_paths
from girder_upload_stream.registry.recording import RegistryRecorder, RegistrySaver
from girder_upload_stream.loop.runner import SideJob, StopSignal, StreamRunner
from girder_upload_stream.retry_policy import RetryPolicy
from girder_upload_stream.settings import (GirderSettings, KafkaCryptoSettings, KafkaSettings,
                                           RunSettings)

__all__ = ["kafka_settings", "log_topic_settings", "dead_letter_settings",
           "build_reassembler", "build_runner", "run_memory_plan", "DEAD_LETTER_CHECK_SECONDS",
           "RekeyPlan", "rekey_wanted", "rekey_plan", "build_rekey", "REKEY_CRYPTO_REFUSED",
           "refuse_unprocessed_rekeyed"]

#: Seconds the start waits for the broker to say whether the dead-letter topic exists.
DEAD_LETTER_CHECK_SECONDS = 15.0

logger = logging.getLogger(__name__)


def kafka_settings(config: str, topic: str, group_id: str, n_threads: int,
                   heartbeat_topic: str | None = None, heartbeat_program_id: str | None = None,
                   heartbeat_interval_secs: float = 30.0, *,
                   treat_undecryptable_as_plaintext: bool = False,
                   max_wait_per_decrypt: float = 5.0,
                   max_initial_wait_per_decrypt: float = 60.0,
                   memory: MemoryPlan | None = None) -> KafkaSettings:
    """Read the config file (a path or a bundled name) into typed Kafka settings; a
    ``[kafkacrypto]`` section makes the topic an encrypted one (the three decrypt
    options only matter then). ``memory``: the run's share of the memory budget
    (:func:`~girder_upload_stream.memory_plan.plan_memory`), which sizes librdkafka's
    prefetch unless the config file does."""
    file_config = load_config(resolve_config_path(config))
    crypto = None
    if file_config.uses_kafkacrypto:
        from girder_upload_stream.kafka.crypto import node_dirs
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
    # librdkafka's prefetch is RAM beside the files': its queue and a partition's fetch
    # are sized to the memory budget (64 MiB and 16 MiB from a budget of 1 GiB up). Big
    # fetches keep the single polling thread fed: an A/B on 8 x 256 MiB in disk mode ran
    # 25% slower with librdkafka's 1 MiB per partition and a 32 MiB queue.
    for key, value in (memory or plan_memory(1 << 30, n_threads)).consumer_defaults().items():
        consumer.setdefault(key, value)
    # The broker holds a fetch until fetch.min.bytes have come or fetch.wait.max.ms
    # passed: with librdkafka's 500 ms (and the bundled configs' 100 kB minimum) a topic
    # holding less than that took 0.8-2.8 s from the assignment to the first message,
    # 0.4 s with 100 ms (issue 14, scenario 8). A busy topic fills the minimum at once.
    consumer.setdefault("fetch.wait.max.ms", "100")
    # Once its queue is full, librdkafka waits fetch.queue.backoff.ms (1 s by default)
    # before it fetches again: with a queue sized to the budget, a consumer that keeps
    # up with less than the broker read in bursts, one queue per second (8 x 128 MiB,
    # budget 256 MiB: 42 MiB/s, the polling thread waiting for Kafka 75% of the time).
    # 10 ms refills the queue as soon as the poll loop has room (issue 22 §3).
    consumer.setdefault("fetch.queue.backoff.ms", "10")
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


def log_topic_settings(config: str, topic: str | None, program_id: str | None,
                       interval_secs: float, group_id: str) -> LogTopic | None:
    """The log topic's settings (None without ``topic``): the ``[log]`` section over,
    or instead of, ``[broker]``, as for heartbeats; its ``max.logs.per.message`` and
    ``log.level`` keys configure the buffer, not the producer."""
    if not topic:
        return None
    if interval_secs <= 0:
        raise ConfigError(f"log_interval_secs must be positive, got {interval_secs!r}")
    file_config = load_config(resolve_config_path(config))
    _, max_lines, level = split_log_section(file_config.section("log"), str(file_config.path))
    producer, _, _ = split_log_section(file_config.log_producer_settings(),
                                       str(file_config.path))
    return LogTopic(topic, program_id or f"girder-upload-stream-{group_id}",
                    float(interval_secs), producer, max_lines, level)


def dead_letter_settings(config: str, topic: str | None
                         ) -> tuple[str, dict[str, str]] | None:
    """The dead-letter topic (``--dead_letter_topic``, else the config file's
    ``[dead_letter]`` ``topic``) and its producer's settings; None without one."""
    file_config = load_config(resolve_config_path(config))
    file_topic, producer = file_config.dead_letter_settings()
    chosen = topic or file_topic
    if not chosen:
        return None
    return chosen, producer


@dataclass(frozen=True)
class RekeyPlan:
    """``--rekey_by_file``: the source topic read by the user's group (first hop), the
    internal topic read by the second hop's group, and the internal topic's settings."""

    topic: str
    group_id: str
    internal_topic: str
    internal_group: str
    retention_ms: int
    producer: dict[str, str] = field(repr=False)  # may hold SASL/SSL passwords


#: The first hop's fetches: small per partition, so that the partitions of the source
#: interleave finely on the internal topic (a file's chunks, spread over every source
#: partition, then arrive close together for the second hop, which holds fewer files in
#: progress), and a small prefetch beside the second hop's (memory_plan.py).
FIRST_HOP_FETCH = {"fetch.message.max.bytes": str(1 << 20),
                   "queued.max.messages.kbytes": str(16 << 10)}

#: Why the option is refused on encrypted topics (one line, exit status 2).
REKEY_CRYPTO_REFUSED = (
    "--rekey_by_file cannot be used with a KafkaCrypto config ([kafkacrypto] section): "
    "re-keying needs each chunk's file name, which only decrypting reveals, and the "
    "internal topic would then hold the chunks in plaintext; run one consumer per group "
    "on encrypted topics")


def rekey_wanted(config: str, flag: bool) -> bool:
    """Whether the run re-keys by file (``--rekey_by_file``, or ``enabled = true`` in the
    config file's ``[rekey_by_file]`` section); a :class:`ConfigError` on a KafkaCrypto
    config. Checked first at start, before Girder."""
    file_config = load_config(resolve_config_path(config))
    wanted = flag or (file_config.has_section("rekey_by_file")
                      and file_config.rekey_settings()[0])
    if wanted and file_config.uses_kafkacrypto:
        raise ConfigError(REKEY_CRYPTO_REFUSED)
    return bool(wanted)


def rekey_plan(config: str, kafka: KafkaSettings) -> RekeyPlan:
    """The two hops' names and the internal topic's settings, for ``kafka``'s topic and
    (resolved) group."""
    from girder_upload_stream.kafka.rekey import DEFAULT_RETENTION_MS
    from girder_upload_stream.loop.rekey_book import (internal_group, internal_topic,
                                                       names_a_topic)
    _, retention_ms, producer = load_config(resolve_config_path(config)).rekey_settings()
    inner = internal_topic(kafka.topic, kafka.group_id)
    if not names_a_topic(inner):
        raise ConfigError(f"--rekey_by_file: the consumer group id {kafka.group_id!r} cannot "
                          f"name the internal topic (Kafka topic names are at most 249 "
                          f"characters of letters, digits, '.', '_' and '-')")
    return RekeyPlan(kafka.topic, kafka.group_id, inner, internal_group(kafka.group_id),
                     retention_ms or DEFAULT_RETENTION_MS, producer)


def refuse_unprocessed_rekeyed(kafka: KafkaSettings) -> None:
    """A run without ``--rekey_by_file`` of a group that used it: when its internal topic
    still holds chunks the second hop has not committed past, the start stops with one
    line (exit status 2). The run would read the source from the first hop's commits,
    past those chunks, and their files would never be uploaded."""
    from girder_upload_stream.kafka.rekey import unprocessed_messages
    from girder_upload_stream.loop.rekey_book import (internal_group, internal_topic,
                                                       names_a_topic)
    inner = internal_topic(kafka.topic, kafka.group_id)
    if not names_a_topic(inner):
        return  # a group that cannot name one never used the option
    left = unprocessed_messages(kafka.consumer, kafka.topic, inner,
                                internal_group(kafka.group_id))
    if left:
        raise ConfigError(
            f"the consumer group {kafka.group_id!r} re-keyed this topic by file before: "
            f"{left} chunk message(s) in its internal topic {inner} are not processed yet, "
            f"and a run without --rekey_by_file would never read them; run with "
            f"--rekey_by_file until idle first (docs/architecture.md, 'Turning it off')")


def build_rekey(plan: RekeyPlan, kafka: KafkaSettings) -> tuple[ConsumerGroup, Any]:
    """Make the internal topic when missing, then the second hop's group (reading it,
    joining now) and the first hop (its consumer in the user's group, joining now)."""
    from girder_upload_stream.kafka.rekey import (RekeyProducer, ensure_internal_topic,
                                                  purge_records)
    from girder_upload_stream.loop.rekey_hop import RekeyHop
    partitions, max_bytes = ensure_internal_topic(plan.producer, plan.topic,
                                                  plan.internal_topic, plan.retention_ms)
    second = ConsumerGroup({**kafka.consumer, "group.id": plan.internal_group},
                           plan.internal_topic, keyed_by_file=True)
    first = ConsumerGroup({**kafka.consumer, **FIRST_HOP_FETCH}, plan.topic)
    try:
        second.connect()
        first.connect()
        hop = RekeyHop(first, RekeyProducer(plan.producer, plan.internal_topic, max_bytes),
                       purge_records(plan.producer), topic=plan.topic,
                       group_id=plan.group_id, internal_topic=plan.internal_topic,
                       partitions=partitions)
    except BaseException:
        second.close()
        first.close()
        raise
    logger.info("re-keying %s by file: group %s re-produces it to %s (%d partitions), "
                "read by group %s", plan.topic, plan.group_id, plan.internal_topic,
                partitions, plan.internal_group)
    return second, hop


def _dead_letters(dead_letter: tuple[str, dict[str, str]], kafka: KafkaSettings,
                  recorder: RegistryRecorder) -> DeadLetters:
    """The rejection sink's Kafka half, its topic checked (a missing topic stops the
    start: KafkaTerminalError), attached to the recorder."""
    topic, producer_settings = dead_letter
    producer = DeadLetterProducer(producer_settings, topic)
    producer.check(DEAD_LETTER_CHECK_SECONDS)
    letters = DeadLetters(producer, lambda wanted, timeout: fetch_messages(
        kafka.consumer, wanted, timeout), kafka.group_id)
    recorder.dead_letters = letters
    logger.info("rejected messages go to the dead-letter topic %s", topic)
    return letters


def _secret_values(*settings: dict[str, str]) -> list[str]:
    """Values of librdkafka settings that are secrets (``sasl.password``,
    ``ssl.key.password``, ``sasl.oauthbearer.client.secret``,
    ``sasl.oauthbearer.config``...)."""
    return [value for section in settings for key, value in section.items()
            if ("password" in key or "secret" in key or key == "sasl.oauthbearer.config")
            and value]


def girder_settings(api_url: str | None, api_key: SecretStr | str | None, **options: Any
                    ) -> GirderSettings:
    if not api_url:
        raise ConfigError("no Girder API URL: pass girder_api_url (or set GIRDER_API_URL)")
    if not api_key:
        raise ConfigError("no Girder API key: pass it, set GIRDER_API_KEY, or name a "
                          "Prefect Secret block")
    return GirderSettings(api_url=api_url, api_key=api_key, **options)


def run_memory_plan(run: RunSettings, n_threads: int) -> MemoryPlan:
    """How the run's ``--memory_budget_mb`` is shared out (streams only count when
    ``--stream_min_mb`` is on)."""
    return plan_memory(run.memory_budget_bytes, n_threads,
                       streaming=run.stream_min_bytes is not None)


def build_reassembler(run: RunSettings, output_dir: Path) -> Reassembler:
    """The Reassembler of a run, with the consumer's own folders below ``output_dir``
    (the staging folder, and the logs folder when it is inside) out of reach of the
    paths that messages name."""
    logs_dir = Path(run.logs_dir)
    if run.mode != "memory" and logs_dir.resolve() == output_dir.resolve():
        raise ConfigError(f"--logger_file_path is --output_dir ({output_dir}): in "
                          f"{run.mode} mode files rebuilt there could overwrite the "
                          "registries; give the logs a folder of their own")
    reassembler = Reassembler(run.mode, output_dir, run.max_file_bytes,
                              reserved=reserved_paths(output_dir, [logs_dir]),
                              lazy_checks=True)
    if reassembler.stale_removed:
        logger.info("deleted the staging files of %d earlier run(s) below %s: their "
                    "messages were not committed and are read again",
                    reassembler.stale_removed, output_dir)
    return reassembler


def build_runner(run: RunSettings, kafka: KafkaSettings, submit: Any,
                 extra_jobs: list[SideJob] | None = None, probe: Any = None,
                 early_outcomes: Any = None,
                 registry_fallback: Callable[[], set[tuple[str, str]]] | None = None,
                 log_topic: LogTopic | None = None, secrets: Iterable[str] = (),
                 girder_api_url: str | None = None, stop: StopSignal | None = None,
                 group: ConsumerGroup | None = None,
                 open_stream: Any = None,
                 dead_letter: tuple[str, dict[str, str]] | None = None,
                 rekey: Any = None) -> StreamRunner:
    """Wire a :class:`StreamRunner`; ``submit(unit)`` starts one upload unit and
    ``probe(file_keys)`` a lookup of re-read files in Girder (None: no lookups);
    ``early_outcomes()`` drains the per-file outcomes of units still running; ``stop``
    is the run's stop request (its console's "quit" sets it too); ``group``, a consumer
    group of ``kafka``'s settings made (and joining) beforehand, else one is made;
    ``open_stream(plan)`` opens the streamed upload of a big file (None: every file
    uploads at completion); ``dead_letter``, the dead-letter topic and its producer's
    settings (:func:`dead_letter_settings`), None for none; ``rekey``, the first hop of
    ``--rekey_by_file`` (:func:`build_rekey`; ``group`` then reads the internal topic).
    ``log_topic`` sends the package's log lines to a topic, ``secrets`` (e.g. the
    Girder API key) masked in them; ``girder_api_url`` is named in the start lines.

    ``registry_fallback`` is asked for the (rel_path, generation) of processed files
    only when the logs folder holds no registry of this topic and group (e.g. a
    restart on another machine); the flow passes the latest Prefect artifact's rows."""
    # First, so that the log topic also gets what reading the registries logs.
    log_job = _log_job(log_topic, kafka, secrets) if log_topic is not None else None
    try:
        return _build(run, kafka, submit, extra_jobs, probe, early_outcomes,
                      registry_fallback, log_job, girder_api_url, stop or StopSignal(), group,
                      open_stream, dead_letter, rekey)
    except BaseException:
        if log_job is not None:
            log_job.detach()
        raise


def _log_job(log_topic: LogTopic, kafka: KafkaSettings, secrets: Iterable[str]) -> LogMessages:
    buffer = LogBuffer(log_topic.max_lines, level=log_topic.level,
                       secrets=[*secrets, *_secret_values(
                           kafka.consumer, kafka.heartbeat_producer, log_topic.producer)])
    return LogMessages(LogProducer(log_topic.producer, log_topic.topic, log_topic.program_id),
                       log_topic.interval_secs, buffer, log_topic=log_topic)


def _build(run: RunSettings, kafka: KafkaSettings, submit: Any,
           extra_jobs: list[SideJob] | None, probe: Any, early_outcomes: Any,
           registry_fallback: Callable[[], set[tuple[str, str]]] | None,
           log_job: LogMessages | None, girder_api_url: str | None,
           stop: StopSignal, group: ConsumerGroup | None = None,
           open_stream: Any = None,
           dead_letter: tuple[str, dict[str, str]] | None = None,
           rekey: Any = None) -> StreamRunner:
    output_dir = Path(run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recorder = RegistryRecorder(Path(run.logs_dir), kafka.topic, kafka.group_id)
    letters = _dead_letters(dead_letter, kafka, recorder) if dead_letter else None
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
    reassembler = build_reassembler(run, output_dir)
    memory = run_memory_plan(run, kafka.n_threads)
    processor = StreamProcessor(
        reassembler, download_regex=re.compile(run.download_regex) if run.download_regex else None,
        recorder=recorder, max_unit_files=run.max_unit_files,
        max_unit_bytes=run.max_unit_bytes, retry_delay=run.retry_delay_seconds,
        retry_policy=RetryPolicy.current(), known_done=known_done, known_pending=recorder.pending_keys(),
        known_in_girder=recorder.in_girder_keys() | (known_done - recorder.processed_keys()),
        stale_partial_seconds=run.stale_partial_seconds,
        max_inflight_units=kafka.n_threads,  # the flow runs n_threads upload tasks
        linger_seconds=run.upload_linger_seconds,
        memory_budget_bytes=memory.files_bytes, poll_target_bytes=memory.poll_bytes,
        open_stream=open_stream, stream_min_bytes=run.stream_min_bytes,
        max_files_in_progress=run.max_files_in_progress)
    jobs: list[SideJob] = [Console(run.update_seconds, interactive=run.interactive,
                                   output_dir=output_dir.resolve(), stop=stop),
                           ProgressLine(run.progress_seconds),
                           RegistrySaver(recorder, run.registry_interval_seconds)]
    if kafka.heartbeat_topic:
        producer = HeartbeatProducer(kafka.heartbeat_producer, kafka.heartbeat_topic,
                                     kafka.heartbeat_program_id)
        jobs.append(Heartbeats(producer, kafka.heartbeat_interval_secs))
    if log_job is not None:
        jobs.append(log_job)  # after the console: its shutdown lines go in the last message
    announce_start(kafka, output_dir.resolve(), girder_api_url,
                   log_job.log_topic if log_job is not None else None)
    jobs += extra_jobs or []
    if letters is not None:
        jobs.append(letters)  # last: closes its producer after the final commit
    holder: dict[str, StreamRunner] = {}
    if group is None:
        group = ConsumerGroup(kafka.consumer, kafka.topic, kafkacrypto=kafka.kafkacrypto)
    group.bind(on_revoke=lambda tps: holder["runner"].on_revoke(tps),
               on_assign=processor.assigned, on_lost=lambda tps: holder["runner"].on_lost(tps),
               recorder=recorder)
    runner = StreamRunner(run, processor, group, submit, jobs,
                          save=recorder.try_save,
                          dead_letters=letters.settle if letters is not None else None,
                          upstream=[rekey] if rekey is not None else (),
                          probe=probe, early_outcomes=early_outcomes, stop=stop)
    holder["runner"] = runner
    return runner
