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

Each spec runs twice per repetition: *started together* on the full topic (files/s
from the first process's start to the last file in Girder: the processes' start-up and
the group's first rebalances, in both hops' groups, weigh on a run of a few seconds),
and *joined, then produced* (:func:`joined_run`: the files are produced once every
process holds partitions, files/s from the start of the produce: a deployment that is
running when files come). Per run: duplicates and missing items, and, after the processes stopped, the group's lag at the end of both
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
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.bench_common import KIB, MIB, REPO_ROOT, Stat, new_name, wait_until
from benchmarks.bench_config import Context
from benchmarks.bench_data import CHUNK_SIZE, Dataset, produce, write_random
from benchmarks.bench_girder import (GirderView, committed_offsets, create_topic, delete_topics,
                                     match_items)
from benchmarks.bench_report import Section, ratio
from benchmarks.bench_systems import (RunResult, Spec, display_argv, run_result, stall_for,
                                      start_system, timed_run)
from benchmarks.count_proxy import CountingProxy
from benchmarks.scenario_bigoverlap import StackCpu
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
    partition = re.compile(re.escape(topic) + r"-\d+")  # not <topic>--<group>--by-file-N
    folders = [f for f in data.glob(f"{topic}-*") if partition.fullmatch(f.name)]
    if not folders:
        return None
    return sum(log.stat().st_size for folder in folders for log in folder.glob("*.log"))


def _specs(n: int) -> list[Spec]:
    """Ours without the option, with it in 1, 2 and 4 processes; then the girder-client
    limit with as many upload threads as 1 and 4 processes of ours (the files straight
    from disk, no Kafka: what the same Girder takes at best)."""
    plain = Spec("ours", n, prefect_server=False)
    return ([plain] + [Spec("ours", n, prefect_server=False, rekey=True, processes=k)
                       for k in (1, 2, 4)] + [Spec("limit", n), Spec("limit", 4 * n)])


def _facts(ctx: Context, spec: Spec, topic: str, group: str) -> tuple:
    """(lag at the end of the source, of the internal topic, the internal topic's
    bytes, the source topic's bytes, the internal topic's messages) after a run."""
    internal = f"{topic}--{group}{SUFFIX}"
    if not spec.rekey:
        return lag_at_end(ctx, group, topic), None, None, topic_log_bytes(topic), None
    return (lag_at_end(ctx, group, topic), lag_at_end(ctx, f"{group}{SUFFIX}", internal),
            topic_log_bytes(internal), topic_log_bytes(topic), _messages(ctx, internal))


def _members_joined(admin, groups: list[str], n: int) -> bool:
    """Every group in ``groups`` is stable with ``n`` members, each holding partitions."""
    from confluent_kafka import KafkaException
    for group in groups:
        try:
            described = admin.describe_consumer_groups([group])[group].result(timeout=30)
        except KafkaException:
            return False
        held = [len(m.assignment.topic_partitions) for m in described.members]
        if described.state.name != "STABLE" or len(held) != n or not all(held):
            return False
    return True


def joined_run(ctx: Context, spec: Spec, data: Dataset, delay: float
               ) -> tuple[RunResult, str, str, dict[str, float]]:
    """The processes of ``spec`` start on a fresh empty topic; once every one holds
    partitions of both hops' groups, ``data`` is produced: seconds from the start of
    the produce to the last file in Girder (a running deployment that files reach).
    Returns the result (``cpu_s``: the consumers' CPU-seconds over that span), the
    topic, the group and the CPU-seconds of the stack's services and the machine's
    busy share over the span (:class:`~benchmarks.scenario_bigoverlap.StackCpu`), and
    this process's (``harness``: the proxy's threads, to the end of the wait)."""
    from confluent_kafka.admin import AdminClient
    topic, group, collection = new_name("files"), new_name("group"), new_name(spec.system)
    create_topic(ctx.stack, topic, ctx.sizes.files_scale_partitions)
    ctx.topics.append(topic)
    view, admin = GirderView(ctx.gc, collection), AdminClient(
        {"bootstrap.servers": ctx.stack.bootstrap})
    groups = [group] + ([f"{group}{SUFFIX}"] if spec.rekey else [])
    with CountingProxy(ctx.stack.girder_url, delay=delay) as proxy, StackCpu() as cpu:
        procs = [start_system(ctx.stack, spec, ctx.work, topic, collection, data, proxy.url,
                              i, group) for i in range(spec.processes)]
        try:
            wait_until(lambda: _members_joined(admin, groups, spec.processes), 180,
                       f"{spec.processes} member(s) in {groups}", procs)
            started, harness = time.time(), time.process_time()
            produce(ctx.stack, data, topic, ctx.work / "produce.log")
            view.wait_progress(data.total_bytes, stall_for(data),
                               ctx.timeout_for(data.total_bytes), procs)
            harness = time.process_time() - harness  # mostly the proxy's threads
            check = _settled(view, data)
        finally:
            for proc in procs:
                proc.stop()
            outputs = [proc.output() for proc in procs]
    landed = [item.landed for item in check["complete"].values()]
    result = run_result(spec, data, check, procs, outputs, landed, started,
                        [display_argv(p, ctx.stack, ctx.work) for p in procs])
    result.cpu_s = sum(p.cpu.between(started, max(landed)) for p in procs)
    if not ctx.keep:
        view.delete()
        for i in range(spec.processes):
            shutil.rmtree(ctx.work / f"out-{collection}-{i}", ignore_errors=True)
    return result, topic, group, {**cpu.spent(started, max(landed)), "harness": harness}


def _settled(view: GirderView, data: Dataset, settle: float = 10.0) -> dict:
    """Names, sizes and duplicates; a file may still be finishing for ``settle`` s."""
    deadline = time.monotonic() + settle
    while True:
        check = match_items(view.items(), data.files)
        if not (check["missing"] or check["wrong_size"]) or time.monotonic() > deadline:
            return check
        time.sleep(1)


def _run(ctx: Context, specs: list[Spec], data: Dataset, delay: float
         ) -> tuple[dict[tuple[str, Spec], list[RunResult]], dict[Spec, list[tuple]],
                    dict[Spec, list[dict[str, float]]]]:
    """Every spec twice per repetition, each run with its own group and collection
    through a fresh delaying proxy: ``together`` (the processes start together on the
    repetition's topic, full) and ``joined`` (:func:`joined_run`). Facts per run:
    :func:`_facts`; the CPU spent in the stack in the joined runs."""
    results: dict[tuple[str, Spec], list[RunResult]] = defaultdict(list)
    facts: dict[Spec, list[tuple]] = defaultdict(list)
    spent: dict[Spec, list[dict[str, float]]] = defaultdict(list)
    for rep in ctx.repetitions():
        topic = ctx.topic_with("files", data, ctx.sizes.files_scale_partitions)
        for spec in specs[rep % len(specs):] + specs[:rep % len(specs)]:
            group = new_name("group")
            with CountingProxy(ctx.stack.girder_url, delay=delay) as proxy:
                together = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data,
                                     ctx.timeout_for(data.total_bytes) * 2,
                                     api_url=proxy.url, keep=ctx.keep, group=group)
            if spec.system == "limit":  # no Kafka: started together only
                results[("together", spec)].append(together)
                ctx.log(f"  {spec.label}, {spec.n_threads} threads: {together.seconds:.2f}s "
                        f"({together.files_s:.2f} files/s)")
                continue
            joined, joined_topic, joined_group, cpu = joined_run(ctx, spec, data, delay)
            spent[spec].append(cpu)
            runs = [("together", together, topic, group),
                    ("joined", joined, joined_topic, joined_group)]
            for mode, result, run_topic, run_group in runs:
                results[(mode, spec)].append(result)
                facts[spec].append(fact := _facts(ctx, spec, run_topic, run_group))
                ctx.log(f"  {spec.label}, {mode}: {result.seconds:.2f}s ({result.files_s:.2f} "
                        f"files/s), {result.missing} missing, {result.duplicates} "
                        f"duplicate(s); lag at the end {fact[0]} / {fact[1]}; internal topic "
                        f"{fact[2]} bytes; load "
                        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
                if spec.rekey and not ctx.keep:
                    delete_topics(ctx.stack, [f"{run_topic}--{run_group}{SUFFIX}"])
            ctx.drop_topic(joined_topic)
        ctx.drop_topic(topic)
    return results, facts, spent


def _messages(ctx: Context, topic: str) -> int | None:
    """Messages ever written to ``topic`` (its end offsets' sum)."""
    ends = end_offsets(ctx, topic)
    return None if ends is None else sum(ends.values())


def _show(values: list, fmt=str) -> str:
    """The values of the repetitions, each once (``–``: none known)."""
    shown = list(dict.fromkeys(fmt(v) for v in values if v is not None))
    return " / ".join(shown) if shown else "–"


def _cpu(runs: list[RunResult], spent: list[dict[str, float]]) -> str:
    """Medians of the joined runs: consumers', Girder's, Kafka's and the harness's
    (the proxy's) CPU-seconds from the start of the produce to the last file, and the
    machine's busy share then."""
    def median(values) -> str:
        return Stat.of(values).show("{:.1f}")
    return (f"{median(r.cpu_s for r in runs)} / {median(x.get('girder', 0) for x in spent)} / "
            f"{median(x.get('kafka', 0) for x in spent)} / "
            f"{median(x.get('harness', 0) for x in spent)}, "
            f"{Stat.of(x['machine busy'] for x in spent).median:.0%}")


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
        f"holds it {s.files_scale_delay_ms:g} ms. The processes of one run share a consumer "
        "group. *Started together*: they start at once on the full topic, files/s from the "
        "first start to the last file in Girder (start-up and the group's first "
        "rebalances included). *Joined, then produced*: they start on an empty topic; once "
        "each holds partitions of both hops, the files are produced, files/s from the start "
        "of the produce to the last file in Girder (a running deployment). Higher is "
        "better. Lag at the end: messages past the group's committed offsets once the "
        "processes stopped, on the source topic / on the internal topic, over every run "
        "(0 / 0: all committed). Internal topic: its log segments on the broker's disk.")
    specs = _specs(n)
    results, facts, spent = _run(ctx, specs, data, s.files_scale_delay_ms / 1000)
    rate = {key: Stat.of(r.files_s for r in runs) for key, runs in results.items()}
    plain, one = specs[0], specs[1]
    section.headers = ["system", "files/s, started together", "× 1 process",
                       "files/s, joined then produced", "× 1 process",
                       "× 1 process without the option",
                       "joined: CPU-s of consumers / Girder / Kafka / proxy, machine busy",
                       "missing / duplicates",
                       "lag at the end: source / internal", "internal topic MiB (× source)",
                       "internal topic messages"]
    for spec in specs:
        runs = results[("together", spec)] + results[("joined", spec)]
        fs = facts[spec]
        if spec.system == "limit":
            section.rows.append([f"{spec.label}, {spec.n_threads} threads",
                                 rate[("together", spec)].show("{:.2f}")] + ["–"] * 5 + [
                f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}"]
                + ["–"] * 3)
            continue
        row = [spec.label]
        for mode in ("together", "joined"):
            row += [rate[(mode, spec)].show("{:.2f}"),
                    ratio(rate[(mode, spec)], rate[(mode, one)]) if spec.rekey else "–"]
        row += [ratio(rate[("joined", spec)], rate[("joined", plain)]) if spec != plain
                else "1", _cpu(results[("joined", spec)], spent[spec]),
                f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}",
                f"{_show([f[0] for f in fs])} / {_show([f[1] for f in fs])}",
                (f"{_show([f[2] for f in fs], lambda b: f'{b / MIB:.1f}')} "
                 f"({_show([f[2] / f[3] for f in fs if f[2] and f[3]], lambda x: f'{x:.2f}×')})")
                if spec.rekey else "–",
                _show([f[4] for f in fs]) if spec.rekey else "–"]
        section.rows.append(row)
    two, four = specs[2], specs[3]
    all_runs = [r for runs in results.values() for r in runs]
    section.headline = [
        f"2 processes with `--rekey_by_file`, joined then produced: "
        f"{ratio(rate[('joined', two)], rate[('joined', one)])} the files/s of 1 (goal ≥ "
        f"1.8×), 4: {ratio(rate[('joined', four)], rate[('joined', one)])}; started "
        f"together: {ratio(rate[('together', two)], rate[('together', one)])} and "
        f"{ratio(rate[('together', four)], rate[('together', one)])}; "
        f"{sum(r.duplicates for r in all_runs)} duplicate and "
        f"{sum(r.missing for r in all_runs)} missing item(s) in all; one process with the "
        f"option: {ratio(rate[('joined', one)], rate[('joined', plain)])} the files/s "
        "without it, and every chunk written twice to the broker."]
    load = os.getloadavg()
    limit = [rate[("together", spec)] for spec in specs[4:]]
    section.headline.append(
        f"The same Girder takes the files from girder-client at {limit[0].median:.1f} files/s "
        f"with {specs[4].n_threads} threads and {limit[1].median:.1f} with "
        f"{specs[5].n_threads}: one process of ours reaches "
        f"{ratio(rate[('joined', one)], limit[1])} of the latter.")
    section.notes = missing_notes({spec: results[("together", spec)] + results[("joined", spec)]
                                   for spec in specs}) + [
        "The girder-client limit uploads the same files from disk with a thread pool and "
        "a client per thread, through the same delaying proxy: with 4 processes' worth of "
        "threads it shows what this Girder (one process on the same two cores) takes at "
        "most; a group cannot go faster than that, whatever its members."] + [
        f"Measured on a busy machine ({os.cpu_count()} cores shared with Kafka, Girder, "
        "the proxy and other engineers' test runs): to be re-measured. Load average (1, 5, "
        f"15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {spec.label}"] + results[("together", spec)][0].argv
    shutil.rmtree(data.root, ignore_errors=True)
    return section
