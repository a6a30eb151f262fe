"""Scenario 4 of issue 6: the cost of a crash. SIGKILL the consumer at about half of a
mixed topic, restart it with the same consumer group and output folder (registries),
and measure what the restart reads again and how long it takes to upload again.

*Re-read*: the messages (bytes) the restarted process reads until the last file is in
Girder, from its own summary when it is stopped (``N messages read`` /
``N total messages were consumed``; bytes from our flow's ``bytes_read``: OpenMSIStream
reports no byte count, so its bytes are estimated from the topic's mean message size,
marked ≈). They are divided by the messages (bytes) of the files that were
*incomplete* at the kill (not in Girder with their full size), which is what a restart
must read at least: 1.00 is ideal, more means chunks of files already in Girder are
read again. *Fetched from Kafka* is what came from the broker: OpenMSIStream counts only
the messages its key filter keeps after it rewinds to the start of the topic (see
``_fetched``).

*Committed offsets*: read from Kafka after the kill, the same way for both consumers.
The messages past them are what a plain restart of the group gets; a consumer may
read more (OpenMSIStream rewinds to the start of the topic when its registry lists
files in progress). "Needed messages behind the committed offsets" counts chunks of
incomplete files that the group had already committed past: a consumer that does not
rewind can never finish those files.

*Restart → first new upload* runs from the restarted process's start to the first file
that was not complete at the kill landing in Girder. It includes the group rebalance,
which waits for the killed members' sessions to time out (our consumer sets
``session.timeout.ms`` to 10 s; OpenMSIStream keeps librdkafka's 45 s).
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict

from benchmarks.bench_common import MIB, BenchError, Stat, new_name
from benchmarks.bench_config import Context
from benchmarks.bench_data import Dataset, mixed_tree
from benchmarks.bench_girder import (
    GirderView, TopicIndex, committed_offsets, index_topic, key_prefixes, match_items,
)
from benchmarks.bench_report import Section, ratio
from benchmarks.bench_systems import (
    Spec, display_argv, parse_bytes_read, parse_messages_read, start_system,
)

__all__ = ["restart_once", "scenario_restart"]

#: OpenMSIStream's log line when its registry lists files to finish: it then reads the
#: topic from its first offset and filters the messages by key.
REWIND_LINE = "will start from the beginning of the topic"


def _kafka_view(index: TopicIndex, data: Dataset, complete: set[str],
                committed: dict[int, int]) -> dict:
    """Messages and bytes of the incomplete files, and what the committed offsets leave."""
    prefixes = key_prefixes(data.files)
    out = {"incomplete": 0, "incomplete_bytes": 0, "past_commit": 0, "needed_skipped": 0}
    for (partition, offset), (key, size) in index.messages.items():
        rel = index.file_of(key, prefixes)
        if rel is None:
            raise BenchError(f"message key {key!r} matches no produced file")
        if rel not in complete:
            out["incomplete"] += 1
            out["incomplete_bytes"] += size
        if offset >= max(committed.get(partition, -1), 0):
            out["past_commit"] += 1
        elif rel not in complete:
            out["needed_skipped"] += 1
    return out


def restart_once(ctx: Context, spec: Spec, topic: str, data: Dataset,
                 index: TopicIndex) -> dict:
    """Kill ``spec`` at about half of ``topic``, restart it, and measure the restart."""
    s = ctx.sizes
    group, collection = new_name("restart-group"), new_name(f"restart-{spec.system}")
    view = GirderView(ctx.gc, collection)
    timeout = ctx.timeout_for(data.total_bytes)
    first = start_system(ctx.stack, spec, ctx.work, topic, collection, data, group=group)
    try:
        view.wait_bytes(int(data.total_bytes * s.restart_kill_fraction), timeout, [first])
    finally:
        first.kill()
    complete = set(match_items(view.items(), data.files)["complete"])
    kafka = _kafka_view(index, data, complete, committed_offsets(ctx.stack, group, topic))
    size_at_kill = view.size()
    ctx.log(f"  {spec.label}: killed with {len(complete)}/{data.n_files} files in Girder; "
            f"incomplete files have {kafka['incomplete']} messages, {kafka['past_commit']} "
            "are past the committed offsets")
    second = start_system(ctx.stack, spec, ctx.work, topic, collection, data, index=1,
                          group=group, out_index=0)  # same --output_dir: same registries
    try:
        final = view.wait_progress(data.total_bytes, s.restart_stall_seconds, timeout,
                                   [second], start_size=size_at_kill)
        after = _final_check(view, data, settle=15.0 if final >= data.total_bytes else 0.0)
    finally:
        second.stop()
    output = second.output()
    new_landings = [it.landed for rel, it in after["complete"].items() if rel not in complete]
    read = parse_messages_read(output)
    read_bytes = parse_bytes_read(output)
    mean_size = sum(size for _, size in index.messages.values()) / len(index.messages)
    rewound = REWIND_LINE in output
    result = {
        "fetched": _fetched(spec, read, rewound, len(index.messages), kafka["past_commit"]),
        "rewound": rewound,
        "spec": spec, "complete_at_kill": len(complete), "n_files": data.n_files, **kafka,
        "read": read, "read_bytes": read_bytes if read_bytes is not None else
        (read * mean_size if read is not None else None), "bytes_estimated": read_bytes is None,
        "first_new_s": min(new_landings) - second.started_wall if new_landings else None,
        "all_done_s": max(new_landings) - second.started_wall if new_landings else None,
        "lost": len(after["missing"]) + len(after["wrong_size"]),
        "duplicates": len(after["duplicates"]),
        "argv": [display_argv(first, ctx.stack, ctx.work)],
    }
    if not ctx.keep:
        view.delete()
        shutil.rmtree(ctx.work / f"out-{collection}-0", ignore_errors=True)
    return result


def _fetched(spec: Spec, read: int | None, rewound: bool, in_topic: int,
             past_commit: int) -> int:
    """Messages the restart got from the broker. Ours counts each message handed to it;
    OpenMSIStream's count leaves out what its key filter drops after it rewinds to the
    start of the topic (then it fetches the whole topic), else it reads from the commit."""
    if spec.system == "ours":
        return read or 0
    return in_topic if rewound else max(read or 0, past_commit)


def _final_check(view: GirderView, data: Dataset, settle: float = 15.0) -> dict:
    deadline = time.monotonic() + settle
    while True:
        check = match_items(view.items(), data.files)
        if (not check["missing"] and not check["wrong_size"]) or time.monotonic() > deadline:
            return check
        time.sleep(1)


def _row(spec: Spec, rs: list[dict]) -> list[str]:
    est = "≈ " if any(r["bytes_estimated"] for r in rs) else ""
    return [
        spec.label,
        Stat.of(r["complete_at_kill"] / r["n_files"] * 100 for r in rs).show("{:.0f}%"),
        Stat.of(r["incomplete"] for r in rs).show("{:.0f}"),
        Stat.of(r["read"] for r in rs).show("{:.0f}"),
        Stat.of(r["read"] / r["incomplete"] for r in rs
                if r["read"] is not None and r["incomplete"]).show("{:.2f}"),
        est + Stat.of(r["read_bytes"] / r["incomplete_bytes"] for r in rs
                      if r["read_bytes"] is not None and r["incomplete_bytes"]).show("{:.2f}"),
        Stat.of(r["fetched"] / r["incomplete"] for r in rs if r["incomplete"]).show("{:.2f}")
        + (" (rewound to the start)" if any(r["rewound"] for r in rs) else ""),
        Stat.of(r["past_commit"] / r["incomplete"] for r in rs if r["incomplete"]).show("{:.2f}"),
        Stat.of(r["needed_skipped"] for r in rs).show("{:.0f}"),
        Stat.of(r["first_new_s"] for r in rs).show(), Stat.of(r["all_done_s"] for r in rs).show(),
        str(sum(r["lost"] for r in rs)), str(sum(r["duplicates"] for r in rs))]


def scenario_restart(ctx: Context) -> Section:
    s = ctx.sizes
    data = mixed_tree(ctx.work / "mixed", s.restart_total, s.restart_max_file)
    section = Section(
        f"4. Restart cost: SIGKILL at about {s.restart_kill_fraction:.0%} of a "
        f"{s.restart_total // MIB} MiB mixed topic",
        f"{data.describe()} (16 KiB to {s.restart_max_file // MIB} MiB), {s.partitions} "
        f"partitions, `--n_threads {s.n_threads}`, `--mode memory`. The consumer is SIGKILLed "
        f"once Girder holds {s.restart_kill_fraction:.0%} of the bytes, then started again "
        "with the same `--consumer_group_id` and `--output_dir` (so the registries survive). "
        "Re-read ratios: read by the restart ÷ what the files incomplete at the kill need; "
        "1.00 is ideal, lower is better. The method is in the docstring of "
        "`benchmarks/scenario_restart.py`.")
    specs = [Spec("ours", s.n_threads), Spec("omsi", s.n_threads)]
    runs: dict[Spec, list[dict]] = defaultdict(list)
    for rep in ctx.repetitions():
        topic = ctx.topic_with("restart", data)
        index = index_topic(ctx.stack, topic, data.chunks())
        for spec in specs[rep % 2:] + specs[:rep % 2]:
            runs[spec].append(restart_once(ctx, spec, topic, data, index))
        ctx.drop_topic(topic)
    section.headers = ["system", "files in Girder at the kill", "messages of incomplete files",
                       "messages read by the restart", "messages re-read / incomplete",
                       "bytes re-read / incomplete", "messages fetched from Kafka / incomplete",
                       "past the committed offsets / incomplete",
                       "needed messages behind the committed offsets",
                       "restart → first new upload (s)", "restart → last upload (s)",
                       "lost", "duplicates"]
    section.rows = [_row(spec, runs[spec]) for spec in specs]
    med = {spec.system: (Stat.of(r["read"] / r["incomplete"] for r in runs[spec]
                                 if r["read"] is not None and r["incomplete"]),
                         Stat.of(r["first_new_s"] for r in runs[spec]),
                         Stat.of(r["fetched"] / r["incomplete"] for r in runs[spec]
                                 if r["incomplete"])) for spec in specs}
    section.headline = [
        f"a restart reads {med['ours'][0].median:.2f}× the messages of the incomplete files "
        f"(OpenMSIStream counts {med['omsi'][0].median:.2f}×, but fetches "
        f"{med['omsi'][2].median:.2f}× from Kafka; ours {med['ours'][2].median:.2f}×) and "
        "uploads again after "
        f"{med['ours'][1].median:.1f} s (OpenMSIStream {med['omsi'][1].median:.1f} s); "
        f"{sum(r['lost'] for r in runs[specs[0]])} file(s) lost, "
        f"{sum(r['duplicates'] for r in runs[specs[0]])} duplicate(s)."]
    section.notes.append(
        f"girder-upload-stream ÷ OpenMSIStream: messages re-read "
        f"{ratio(med['ours'][0], med['omsi'][0])} (as each counts them), fetched from Kafka "
        f"{ratio(med['ours'][2], med['omsi'][2])}, time to the first new upload "
        f"{ratio(med['ours'][1], med['omsi'][1])} (lower is better for all).")
    section.notes.append(
        "Messages fetched from Kafka: ours counts every message it is handed, including "
        "those dropped unread after a seek over finished messages (offsets rule 8; what "
        "librdkafka prefetched and discarded at the seek is not counted). OpenMSIStream, "
        f"when its log says it \"{REWIND_LINE}\", reads every partition from its first "
        "offset and counts only the messages its key filter lets through: its fetched "
        "count is then the whole topic. Without that line it reads from its committed "
        "offsets.")
    for spec in specs:
        lost = sum(r["lost"] for r in runs[spec])
        if lost:
            section.notes.append(
                f"{spec.label}: {lost} file(s) never reached Girder after the restart, over "
                f"{len(runs[spec])} repetition(s) (the harness gives up after "
                f"{s.restart_stall_seconds:g} s without progress).")
    section.commands = [f"# {' '.join(ctx.argv)}"] + [
        line for spec in specs for line in [f"# {spec.label} (started twice, same group)",
                                            *runs[spec][0]["argv"]]]
    shutil.rmtree(data.root, ignore_errors=True)
    return section
