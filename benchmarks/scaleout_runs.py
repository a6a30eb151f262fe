"""One run of scenarios 10 and 11 of ``make bench`` (issue 23), and what Kafka says after
it: the processes of one spec upload a dataset through a delaying proxy while the CPU
of every process involved is sampled.

Two kinds of run (:func:`observed_run`): *started together* (the processes start at
once on a topic already produced; time from the first start) and *joined, then
produced* (they start on an empty topic; once every one holds partitions of both hops'
groups, the files are produced; time from the start of the produce). Either way the
result holds the files/s over the whole run and between 10% and 90% of the files
landed (Girder's own timestamps), and a :class:`~benchmarks.scaleout_figures.RunCpu`:
each process's CPU-seconds, the stack's services', the producer's (joined runs), the
benchmark process's own (the proxy is threads in it) and the machine's busy share.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import cpu_census as census
from benchmarks.bench_common import REPO_ROOT, new_name, wait_until
from benchmarks.bench_config import Context
from benchmarks.bench_data import Dataset, produce
from benchmarks.bench_girder import GirderView, committed_offsets, create_topic, match_items
from benchmarks.bench_systems import (RunResult, Spec, display_argv, failure_hint,
                                      parse_first_message, run_result, stall_for, start_system)
from benchmarks.count_proxy import CountingProxy
from benchmarks.scaleout_figures import RunCpu, beyond_delay_ms, steady_rate
from benchmarks.scenario_bigoverlap import StackCpu

__all__ = ["SUFFIX", "Observed", "observed_run", "end_offsets", "lag_at_end",
           "topic_log_bytes", "run_facts"]

SUFFIX = "--by-file"
_SMALL_IN_FLIGHT = re.compile(r"small-file uploads: at most (\d+) in flight")


@dataclass
class Observed:
    """One run: its result, its steady-state files/s, where the CPU went, and the
    topic and group it used (for the lag read afterwards)."""

    result: RunResult
    steady: float | None
    cpu: RunCpu
    topic: str
    group: str
    #: the duplicated or missing paths, and where the processes' logs were kept then
    evidence: str | None = None
    requests: int = 0  # Girder requests through the proxy over the run (start-up included)
    max_in_flight: int = 0  # the most Girder requests the proxy held at once
    #: ms per request beyond the proxy's delay (Girder + the proxy), median and p90
    beyond_ms: tuple[float | None, float | None] = (None, None)
    small_in_flight: int | None = None  # ours: most small-file uploads at once, a process
    routes: dict[str, int] = field(default_factory=dict)  # Girder requests by route


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


def run_facts(ctx: Context, spec: Spec, topic: str, group: str) -> tuple:
    """(lag at the end of the source, of the internal topic, the internal topic's
    bytes, the source topic's bytes, the internal topic's messages) after a run."""
    internal = f"{topic}--{group}{SUFFIX}"
    if not spec.rekey:
        return lag_at_end(ctx, group, topic), None, None, topic_log_bytes(topic), None
    ends = end_offsets(ctx, internal)
    return (lag_at_end(ctx, group, topic), lag_at_end(ctx, f"{group}{SUFFIX}", internal),
            topic_log_bytes(internal), topic_log_bytes(topic),
            None if ends is None else sum(ends.values()))


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


def _children_cpu() -> float:
    """CPU-seconds of this process's reaped children (the producer once it exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _settled(view: GirderView, data: Dataset, settle: float = 10.0) -> dict:
    """Names, sizes and duplicates; a file may still be finishing for ``settle`` s."""
    deadline = time.monotonic() + settle
    while True:
        check = match_items(view.items(), data.files)
        if not (check["missing"] or check["wrong_size"]) or time.monotonic() > deadline:
            return check
        time.sleep(1)


def _start_and_wait(ctx: Context, spec: Spec, data: Dataset, proxy_url: str,
                    topic: str | None, collection: str, group: str, view: GirderView,
                    services: list[int]):
    """Start the processes; joined (``topic`` None): on a fresh topic, produce once all
    joined. Wait for the files. Returns (procs, started, producer CPU-s, topic, check,
    the CPU spent outside the run: :func:`benchmarks.cpu_census.spent`)."""
    from confluent_kafka.admin import AdminClient
    joined = topic is None
    if joined:
        topic = new_name("files")
        create_topic(ctx.stack, topic, ctx.sizes.files_scale_partitions)
        ctx.topics.append(topic)
    procs = [start_system(ctx.stack, spec, ctx.work, topic, collection, data, proxy_url, i,
                          group) for i in range(spec.processes)]
    producer, before = 0.0, census.take()
    if joined:
        admin = AdminClient({"bootstrap.servers": ctx.stack.bootstrap})
        groups = [group] + ([f"{group}{SUFFIX}"] if spec.rekey else [])
        wait_until(lambda: _members_joined(admin, groups, spec.processes), 180,
                   f"{spec.processes} member(s) in {groups}", procs)
        started, producer, before = time.time(), _children_cpu(), census.take()
        produce(ctx.stack, data, topic, ctx.work / "produce.log")
        producer = _children_cpu() - producer
    else:
        started = min(p.started_wall for p in procs)
    timeout = ctx.timeout_for(data.total_bytes) * (1 if joined else 2)
    view.wait_progress(data.total_bytes, stall_for(data), timeout, procs)
    outside = census.spent(before, census.take(), [os.getpid(), *services])
    return procs, started, producer, topic, _settled(view, data), outside


def observed_run(ctx: Context, spec: Spec, data: Dataset, delay: float,
                 topic: str | None = None) -> Observed:
    """One run of ``spec`` into a fresh collection through a fresh proxy holding every
    Girder request ``delay`` s, with its own consumer group: started together on
    ``topic`` (already produced) or, when ``topic`` is None, joined then produced on a
    fresh topic (the caller drops it). The limit reads the files from disk (``topic``
    only names its root folder)."""
    collection, group = new_name(spec.system), new_name("group")
    view = GirderView(ctx.gc, collection)
    with CountingProxy(ctx.stack.girder_url, delay=delay) as proxy, \
            StackCpu(with_self=True) as stack_cpu:
        wait_until(lambda: stack_cpu.total.samples, 10, "a first CPU sample")
        procs = []
        try:
            procs, started, producer, topic, check, outside = _start_and_wait(
                ctx, spec, data, proxy.url, topic, collection, group, view,
                list(stack_cpu.pids.values()))
        finally:
            for proc in procs:
                proc.stop()
            outputs = [proc.output() for proc in procs]
        requests, max_in_flight, routes = proxy.total, proxy.max_in_flight, dict(proxy.counts)
        beyond = beyond_delay_ms(list(proxy.latencies), delay)
    landed = [item.landed for item in check["complete"].values()]
    result = run_result(spec, data, check, procs, outputs, landed, started,
                        [display_argv(p, ctx.stack, ctx.work) for p in procs])
    end = max(landed)
    per_process = [p.cpu.between(started, end) for p in procs]
    result.cpu_s = sum(per_process)
    firsts = [n for _, n in map(parse_first_message, outputs) if n is not None]
    result.uploads_in_flight = max(firsts) if firsts else None
    if result.missing:
        result.failure = next((h for h in map(failure_hint, outputs) if h), None)
        result.missing_detail = (check["missing"] + check["wrong_detail"])[:3]
    spent = stack_cpu.spent(started, end)
    busy, harness = spent.pop("machine busy"), spent.pop("harness", 0.0)
    cpu = RunCpu(end - started, result.n_files, per_process, spent, harness, producer, busy,
                 os.cpu_count() or 1, outside)
    evidence = _keep_evidence(ctx, collection, check, procs)
    if not ctx.keep:
        view.delete()
        for i in range(spec.processes):
            shutil.rmtree(ctx.work / f"out-{collection}-{i}", ignore_errors=True)
    small = [int(n) for out in outputs for n in _SMALL_IN_FLIGHT.findall(out)]
    return Observed(result, steady_rate(landed), cpu, topic, group, evidence, requests,
                    max_in_flight, beyond, max(small) if small else None, routes)


def _keep_evidence(ctx: Context, collection: str, check: dict, procs: list) -> str | None:
    """When files are doubled or missing: copy the processes' logs and registries out
    of the scratch folder (deleted at the end) and say which paths and where."""
    bad = check["duplicates"] + check["missing"] + check["wrong_size"]
    if not bad:
        return None
    kept = Path(tempfile.gettempdir()) / f"gus-bench-evidence-{collection}"
    kept.mkdir(parents=True, exist_ok=True)
    for i, proc in enumerate(procs):
        shutil.copy2(proc.log, kept / proc.log.name)
        out = ctx.work / f"out-{collection}-{i}"
        if out.is_dir():
            shutil.copytree(out, kept / out.name, dirs_exist_ok=True)
    return (f"duplicates {check['duplicates'][:5]}, missing {check['missing'][:5]}, wrong "
            f"size {check['wrong_size'][:5]}; logs and registries in {kept}")
