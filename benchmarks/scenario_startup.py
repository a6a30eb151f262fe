"""Scenario 8 of issue 14: start-up, from the process's start to the first file in
Girder, for our two commands (with and without a Prefect server configured) and
OpenMSIStream 1.8.8's ``GirderUploadStreamProcessor``.

Each repetition produces one small file to a fresh topic, then starts every system in
turn on it (fresh group, fresh collection) and times, by Girder's clock, the moment the
file's content landed against the moment the process was started. Before the first
repetition every system runs once untimed (a warm start: page cache, ``.pyc`` files,
the scratch ``PREFECT_HOME`` of the runs without a server, Girder's first requests).

Our consumers log their start-up timeline (``girder_upload_stream/startup.py``): the
marks, in seconds since the process started, are shown as the breakdown. The import
cost of each program is measured on its own with ``python -X importtime``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import defaultdict

from benchmarks.bench_common import KIB, OMSI_BIN, OUR_PYTHON, REPO_ROOT, Stat
from benchmarks.bench_config import Context
from benchmarks.bench_data import small_tree
from benchmarks.bench_report import Section, md_table, ratio
from benchmarks.bench_systems import RunResult, Spec, timed_run

__all__ = ["scenario_startup", "parse_timeline", "import_seconds", "broker_join_delay"]

#: A timeline line once the first file is in Girder (with a Prefect server, a later
#: one adds the flow run's marks: the last such line is read).
_TIMELINE = re.compile(r"start-up: (.*first file in Girder at [\d.]+ s.*?)\s*$", re.M)
_MARK = re.compile(r"(.+?) at ([\d.]+) s$")

#: The modules each program imports before it does anything (``-X importtime``).
IMPORTS = {
    "girder-upload-stream (command line)": (OUR_PYTHON, "girder_upload_stream.cli.main"),
    "girder-upload-stream (the Prefect flow)": (OUR_PYTHON,
                                                "girder_upload_stream.flows.upload_stream"),
    "OpenMSIStream 1.8.8": (OMSI_BIN / "python",
                            "openmsistream.girder.girder_upload_stream_processor"),
}


def parse_timeline(output: str) -> dict[str, float]:
    """The marks of the last complete start-up line of our consumer's output."""
    found = _TIMELINE.findall(output)
    if not found:
        return {}
    marks = {}
    for part in found[-1].split("; "):
        match = _MARK.match(part.strip())
        if match:
            marks[match.group(1)] = float(match.group(2))
    return marks


def import_seconds(python, module: str, reps: int = 3) -> float | None:
    """Median cumulative import time of ``module`` (its own line of ``-X importtime``)."""
    values = []
    for _ in range(reps):
        done = subprocess.run([str(python), "-X", "importtime", "-c", f"import {module}"],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[2] == module:
                values.append(int(parts[1]) / 1e6)
    return Stat.of(values).median if values else None


def broker_join_delay(bootstrap: str) -> str:
    """The broker's ``group.initial.rebalance.delay.ms`` (how long a new group's first
    join waits for more members)."""
    from confluent_kafka.admin import AdminClient, ConfigResource
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        broker = next(iter(admin.list_topics(timeout=10).brokers))
        resource = ConfigResource("BROKER", str(broker))
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        return configs["group.initial.rebalance.delay.ms"].value
    except Exception as exc:  # noqa: BLE001 - only reported
        return f"unknown ({exc})"


def _specs(n: int) -> list[Spec]:
    return [Spec("ours", n), Spec("ours", n, prefect_server=False),
            Spec("ours_dropin", n, prefect_server=False), Spec("omsi", n)]


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def scenario_startup(ctx: Context) -> Section:
    s = ctx.sizes
    data = small_tree(ctx.work / "startup", 1, 64 * KIB, seed=8)
    specs = _specs(s.n_threads)
    results: dict[Spec, list[RunResult]] = defaultdict(list)
    timelines: dict[Spec, list[dict[str, float]]] = defaultdict(list)
    loads = []
    topic = ctx.topic_with("startup", data)
    ctx.log("warm-up: every system once, untimed")
    for spec in specs:
        timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data, 180, keep=ctx.keep)
    for rep in ctx.repetitions():
        order = specs[rep % len(specs):] + specs[:rep % len(specs)]
        for spec in order:
            loads.append(_load())
            result = timed_run(ctx.stack, ctx.gc, spec, ctx.work, topic, data, 180,
                               keep=ctx.keep)
            results[spec].append(result)
            timelines[spec].append(parse_timeline(result.outputs[0]))
            ctx.log(f"  {spec.label}: first file at {result.first_s:.2f}s "
                    f"(load {loads[-1]})")
            time.sleep(1)
    ctx.drop_topic(topic)
    shutil.rmtree(data.root, ignore_errors=True)
    return _section(ctx, specs, results, timelines, loads)


def _section(ctx: Context, specs: list[Spec], results, timelines, loads) -> Section:
    omsi = Stat.of(r.first_s for r in results[specs[-1]])
    section = Section(
        "8. Start-up: process start → first file in Girder",
        f"One file of 64 KiB on a fresh topic of {ctx.sizes.partitions} partitions, a fresh "
        f"group (`create_new`) and collection per run, `--n_threads {ctx.sizes.n_threads}`; "
        "seconds from the process's start to the file's content in Girder (Girder's "
        "clock), median (min–max) of the repetitions after one untimed warm-up run of "
        "each system. Lower is better; '× OpenMSIStream' > 1 is slower.")
    section.headers = ["system", "start → first file (s)", "× OpenMSIStream"]
    for spec in specs:
        first = Stat.of(r.first_s for r in results[spec])
        section.rows.append([spec.label, first.show("{:.2f}"),
                             ratio(first, omsi) if spec.system != "omsi" else "1"])
    section.extra = _breakdown(specs, timelines) + _imports()
    delay = broker_join_delay(ctx.stack.bootstrap)
    section.notes = [
        f"The broker's `group.initial.rebalance.delay.ms` is {delay} here (Kafka's default "
        "is 3000): a new group's first join waits that long for more members, for "
        "OpenMSIStream and ours alike.",
        f"Load average (1, 5, 15 min) before each timed run: {', '.join(loads)}.",
        "Runs without a Prefect server have no `PREFECT_API_URL` and a scratch "
        "`PREFECT_HOME`, as a command-line user who never set up Prefect.",
        "With a Prefect server the command consumes at once, on the plain upload pool, "
        "while a background thread imports Prefect and creates the flow run "
        "(`prefect_glue/late_flow_run.py`); `flow run attached` is when the flow run took "
        "the run over (later units are its task runs; its artifacts hold every file). "
        "The marks after `first file in Girder` come from the line logged at that moment.",
    ]
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {spec.label}"] + results[spec][0].argv
    first = {spec: Stat.of(r.first_s for r in results[spec]) for spec in specs}
    section.headline = [
        "Start → first file in Girder: " + "; ".join(
            f"{spec.label} {first[spec].median:.2f} s"
            + (f" ({ratio(first[spec], omsi)} OpenMSIStream's)" if spec.system != "omsi" else "")
            for spec in specs) + "."]
    return section


def _breakdown(specs: list[Spec], timelines) -> list[str]:
    """A table: each mark of our consumers' timelines (median seconds since start)."""
    ours = [spec for spec in specs if spec.system != "omsi"]
    names: list[str] = []
    for spec in ours:
        for timeline in timelines[spec]:
            names += [n for n in timeline if n not in names]
    if not names:
        return []
    rows = []
    for name in names:
        rows.append([name] + [Stat.of(t.get(name) for t in timelines[spec]).show("{:.2f}")
                              for spec in ours])
    return ["Our start-up timeline (seconds since the process started, median of the "
            "repetitions; a mark missing from a column did not happen in that mode):", "",
            md_table(["mark"] + [spec.label for spec in ours], rows), ""]


def _imports() -> list[str]:
    rows = [[name, f"{seconds:.2f}" if (seconds := import_seconds(python, module)) is not None
             else "n/a", f"`{module}`"] for name, (python, module) in IMPORTS.items()]
    return ["Import time, each measured alone (`python -X importtime -c 'import M'`, "
            "cumulative, median of 3):", "",
            md_table(["program", "imports (s)", "module"], rows), ""]
