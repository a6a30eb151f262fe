"""Scenario 10 of ``make bench`` (issue 23): scale-out with files of several chunks.

As a user scaling out would: 120 files of 2 to 4 chunks of OpenMSIStream's default
512 KiB, 4 partitions, Girder 20 ms away (every request through
:class:`~benchmarks.count_proxy.CountingProxy` with a delay), and 1, 2 and 4
processes of one consumer group with ``--rekey_by_file``, plus 1 process without it.
Without the option, the chunks of one file are spread over the partitions (the
producer keys each chunk by path and chunk number), so the members of a group each
hold part of each file: issue 23 saw two processes upload 56 of 120 files, then stand
still for the stale timeout. With it, each process's first hop re-produces its share of
the source topic to ``<topic>--<group>--by-file`` keyed by file, and its second hop
rebuilds the files of its share of that topic.

Per run: files/s (first process's start to the last file in Girder), duplicates and
missing items, and, after the processes stopped, the group's lag at the end of both
topics (end offsets minus the committed ones: 0 when every message is accounted for).
The cost of the option for one process: files/s on against off, and the broker bytes
of the internal topic (its partitions' log files on the local broker's disk, against
the source topic's: every chunk is written twice). The processes run without a Prefect
server (a command-line user's default), so that the machine's two cores go to the
consumers, Kafka and Girder rather than to Prefect's imports.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

from benchmarks.bench_common import KIB, MIB, REPO_ROOT, Stat, new_name
from benchmarks.bench_config import Context
from benchmarks.bench_data import CHUNK_SIZE, Dataset, write_random
from benchmarks.bench_girder import committed_offsets, delete_topics
from benchmarks.bench_report import Section, ratio
from benchmarks.bench_systems import RunResult, Spec, timed_run
from benchmarks.count_proxy import CountingProxy
from benchmarks.scenario_throughput import missing_notes

__all__ = ["scenario_scaleout_files", "several_chunks_tree", "end_offsets", "lag_at_end",
           "topic_log_bytes"]

SUFFIX = "--by-file"


def several_chunks_tree(root: Path, n_files: int, seed: int = 23) -> Dataset:
    """``n_files`` files of 2 to 4 chunks of :data:`CHUNK_SIZE` (sizes drawn uniformly
    in between, seeded) in ``run-{0..4}/``."""
    rng = random.Random(seed)
    data = Dataset(root)
    for i in range(n_files):
        rel, size = f"run-{i % 5}/f{i:04d}.bin", rng.randint(CHUNK_SIZE + 1, 4 * CHUNK_SIZE)
        write_random(root / rel, size, seed * 1_000_003 + i)
        data.files[rel] = size
    return data


def end_offsets(ctx: Context, topic: str) -> dict[int, int] | None:
    """``{partition: high watermark}`` of ``topic``; None when there is no such topic."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    consumer = Consumer({"bootstrap.servers": ctx.stack.bootstrap,
                         "group.id": f"{topic}-watermarks", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                for p in meta.partitions}
    except KafkaException:
        return None
    finally:
        consumer.close()


def lag_at_end(ctx: Context, group: str, topic: str) -> int | None:
    """Messages of ``topic`` past ``group``'s committed offsets (None: no topic)."""
    ends = end_offsets(ctx, topic)
    if ends is None:
        return None
    committed = committed_offsets(ctx.stack, group, topic)
    return sum(max(0, end - max(0, committed.get(p, 0))) for p, end in ends.items())


def topic_log_bytes(topic: str) -> int | None:
    """Bytes of ``topic``'s log segments on the local stack's broker (the folder of
    stack/kafka.py's ``log.dirs``); None when the broker is not the local one. The
    segments are 64 MiB there, so a purge (``delete_records``) of this scenario's few
    MiB per partition moves the log start but deletes no file: the bytes written."""
    data = Path(os.environ.get("GUS_STACK_DIR", REPO_ROOT / ".stack")) / "kafka" / "data"
    folders = [f for f in data.glob(f"{topic}-*") if f.name.rsplit("-", 1)[-1].isdigit()]
    if not folders:
        return None
    return sum(log.stat().st_size for folder in folders for log in folder.glob("*.log"))


def _specs(n: int) -> list[Spec]:
    plain = Spec("ours", n, prefect_server=False)
    return [plain] + [Spec("ours", n, prefect_server=False, rekey=True, processes=k)
                      for k in (1, 2, 4)]


def _run(ctx: Context, specs: list[Spec], data: Dataset, delay: float
         ) -> tuple[dict[Spec, list[RunResult]], dict[Spec, list[tuple]]]:
    """Every spec once per repetition, on a fresh topic per repetition, each run with
    its own group and collection through a fresh delaying proxy. Facts per run:
    (lag at the end of the source, of the internal topic, internal topic's bytes,
    source topic's bytes, internal topic's messages)."""
    results: dict[Spec, list[RunResult]] = defaultdict(list)
    facts: dict[Spec, list[tuple]] = defaultdict(list)
    s = ctx.sizes
    for rep in ctx.repetitions():
        topic = ctx.topic_with("files", data, s.files_scale_partitions)
        for spec in specs[rep % len(specs):] + specs[:rep % len(specs)]:
            group = new_name("group")
            internal = f"{topic}--{group}{SUFFIX}"
            with CountingProxy(ctx.stack.girder_url, delay=delay) as proxy:
                result = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data,
                                   ctx.timeout_for(data.total_bytes) * 2, api_url=proxy.url,
                                   keep=ctx.keep, group=group)
            fact = (lag_at_end(ctx, group, topic),
                    lag_at_end(ctx, f"{group}{SUFFIX}", internal) if spec.rekey else None,
                    topic_log_bytes(internal) if spec.rekey else None, topic_log_bytes(topic),
                    _messages(ctx, internal) if spec.rekey else None)
            results[spec].append(result)
            facts[spec].append(fact)
            ctx.log(f"  {spec.label}: {result.seconds:.2f}s ({result.files_s:.2f} files/s), "
                    f"{result.missing} missing, {result.duplicates} duplicate(s); lag at the "
                    f"end {fact[0]} / {fact[1]}; internal topic {fact[2]} bytes; load "
                    f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            if spec.rekey and not ctx.keep:
                delete_topics(ctx.stack, [internal])
        ctx.drop_topic(topic)
    return results, facts


def _messages(ctx: Context, topic: str) -> int | None:
    """Messages ever written to ``topic`` (its end offsets' sum)."""
    ends = end_offsets(ctx, topic)
    return None if ends is None else sum(ends.values())


def _show(values: list, fmt=str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    return " / ".join(fmt(v) for v in known) if len(set(known)) > 1 else fmt(known[0])


def scenario_scaleout_files(ctx: Context) -> Section:
    s = ctx.sizes
    n = s.n_threads
    data = several_chunks_tree(ctx.work / "files", s.files_scale_files)
    section = Section(
        f"10. Scale-out with files of several chunks: 1, 2 and 4 processes of one group, "
        f"Girder {s.files_scale_delay_ms:g} ms away",
        f"{data.describe()} (2 to 4 chunks of {CHUNK_SIZE // KIB} KiB each), "
        f"{s.files_scale_partitions} partitions, `--n_threads {n}` per process, "
        f"`--mode memory`, no Prefect server; every Girder request through a proxy that "
        f"holds it {s.files_scale_delay_ms:g} ms. Processes of one run share a consumer "
        "group and start together. Files/s: first start to the last file in Girder; higher "
        "is better. Lag at the end: messages past the group's committed offsets once the "
        "processes stopped, on the source topic / on the internal topic (0 / 0: all "
        "committed). Internal topic: its log segments on the broker's disk.")
    specs = _specs(n)
    results, facts = _run(ctx, specs, data, s.files_scale_delay_ms / 1000)
    rate = {spec: Stat.of(r.files_s for r in results[spec]) for spec in specs}
    plain, one = specs[0], specs[1]
    section.headers = ["system", "processes", "files/s", "× 1 process (--rekey_by_file)",
                       "× 1 process without the option", "missing / duplicates",
                       "lag at the end: source / internal", "internal topic MiB (× source)",
                       "internal topic messages"]
    for spec in specs:
        runs, fs = results[spec], facts[spec]
        section.rows.append([
            spec.label, str(spec.processes), rate[spec].show("{:.2f}"),
            ratio(rate[spec], rate[one]) if spec.rekey else "–",
            ratio(rate[spec], rate[plain]) if spec != plain else "1",
            f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}",
            f"{_show([f[0] for f in fs])} / {_show([f[1] for f in fs])}",
            (f"{_show([f[2] for f in fs], lambda b: f'{b / MIB:.1f}')} "
             f"({_show([f[2] / f[3] for f in fs if f[2] and f[3]], lambda x: f'{x:.2f}×')})")
            if spec.rekey else "–",
            _show([f[4] for f in fs]) if spec.rekey else "–"])
    two = specs[2]
    section.headline = [
        f"2 processes with `--rekey_by_file` run at {ratio(rate[two], rate[one])} the rate "
        f"of 1 (goal ≥ 1.8×), 4 at {ratio(rate[specs[3]], rate[one])}; "
        f"{sum(r.duplicates for spec in specs for r in results[spec])} duplicate and "
        f"{sum(r.missing for spec in specs for r in results[spec])} missing item(s) in all; "
        f"one process with the option: {ratio(rate[one], rate[plain])} the files/s "
        "without it."]
    load = os.getloadavg()
    section.notes = missing_notes(results) + [
        f"Measured on a busy machine ({os.cpu_count()} cores shared with Kafka, Girder and "
        "other engineers' test runs): to be re-measured. Load average (1, 5, 15 min) at "
        f"the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {spec.label}"] + results[spec][0].argv
    shutil.rmtree(data.root, ignore_errors=True)
    return section
