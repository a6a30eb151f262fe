"""Scenario 6 of issue 6: soak. Produce at a fixed rate for N minutes (30 by default)
while the consumers run; sample their RSS, the Prefect database and their progress
every minute; at the end check that nothing was lost and nothing is there twice.

A producer thread writes a batch of files every ``soak_batch_seconds`` (each batch in
its own folder, so no path repeats) and sends it with ``girder-upload-stream produce``.
Our consumer and, unless ``--no-soak-baseline``, OpenMSIStream's consume the same topic
at the same time, each with its own consumer group and collection: the rate is low
enough for both to keep up, so they see the same stream under the same conditions.
"""

from __future__ import annotations

import shutil
import threading
import time

from benchmarks.bench_common import KIB, MIB, BenchError, Proc, new_name
from benchmarks.bench_config import Context
from benchmarks.bench_data import Dataset, produce, write_random
from benchmarks.bench_girder import GirderView, create_topic, match_items
from benchmarks.bench_prefect import (db_logical_bytes, flow_run_ids, growth_by_table,
                                      table_bytes, table_rows, task_runs)
from benchmarks.bench_report import Section, md_table
from benchmarks.bench_systems import (
    Spec, display_argv, failure_hint, stall_for, start_system,
)

__all__ = ["SoakProducer", "scenario_soak"]

#: Tables of Prefect's events, trimmed by the server's event retention (db_vacuum).
EVENT_TABLES = ("events", "event_resources")


class SoakProducer(threading.Thread):
    """Produces ``rate`` files/s of ``size`` bytes to ``topic`` in batches until stopped;
    ``data`` accumulates every file produced (the files are deleted once sent)."""

    def __init__(self, ctx: Context, topic: str) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.ctx, self.topic = ctx, topic
        self.data = Dataset(ctx.work / "soak")
        self.stop_event = threading.Event()
        self.error: Exception | None = None
        self.batches = 0

    def run(self) -> None:
        s = self.ctx.sizes
        per_batch = max(1, round(s.soak_files_per_second * s.soak_batch_seconds))
        started = time.monotonic()
        try:
            while not self.stop_event.is_set():
                name = f"b{self.batches:05d}"
                batch_dir = self.ctx.work / "soak-batches" / name
                files = {}
                for j in range(per_batch):
                    rel = f"{name}/f{j:03d}.bin"
                    seed = 6_000_000 + self.batches * 1000 + j
                    write_random(batch_dir / rel, s.soak_file_size, seed)
                    files[rel] = s.soak_file_size
                produce(self.ctx.stack, batch_dir, self.topic, self.ctx.work / "soak-produce.log")
                self.data.files.update(files)
                shutil.rmtree(batch_dir, ignore_errors=True)
                self.batches += 1
                next_at = started + self.batches * s.soak_batch_seconds
                self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported by the scenario
            self.error = exc


def scenario_soak(ctx: Context) -> Section:
    s = ctx.sizes
    rate_mb = s.soak_files_per_second * s.soak_file_size / 1e6
    section = Section(
        f"6. Soak: {s.soak_minutes:g} minute(s) of steady producing",
        f"{s.soak_files_per_second:g} files/s of {s.soak_file_size // KIB} KiB "
        f"({rate_mb:.2f} MB/s) in batches every {s.soak_batch_seconds:g} s, {s.partitions} "
        f"partitions, `--n_threads {s.n_threads}`, `--mode memory`; RSS, the Prefect database "
        f"(live pages) and the bytes in Girder sampled every {s.soak_sample_seconds:g} s. "
        + ("OpenMSIStream consumes the same topic at the same time, into its own collection."
           if s.soak_baseline else ""))
    topic = new_name("soak")
    create_topic(ctx.stack, topic, s.partitions)
    ctx.topics.append(topic)
    systems = [Spec("ours", s.n_threads)] + ([Spec("omsi", s.n_threads)] if s.soak_baseline else [])
    views = {spec: GirderView(ctx.gc, new_name(f"soak-{spec.system}")) for spec in systems}
    db0, tables0, rows0 = db_logical_bytes(), table_bytes(), table_rows()
    procs: dict[Spec, Proc] = {}
    producer = SoakProducer(ctx, topic)
    samples: list[list[str]] = []
    peaks = {spec: 0 for spec in systems}
    try:
        for spec in systems:
            procs[spec] = start_system(ctx.stack, spec, ctx.work, topic, views[spec].name,
                                       producer.data)
        producer.start()
        started = time.monotonic()
        end = started + s.soak_minutes * 60
        next_sample = started
        while True:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(_sample(now - started, producer, procs, views, db0, peaks))
                next_sample += s.soak_sample_seconds
            if now >= end:
                break
            for proc in procs.values():
                proc.check_alive()
            if producer.error:
                raise BenchError(f"soak producer failed: {producer.error}")
            time.sleep(min(1.0, max(0.05, min(next_sample, end) - time.monotonic())))
        producer.stop_event.set()
        producer.join(120)
        stopped_producing = time.monotonic()
        expected = producer.data
        ctx.log(f"  produced {expected.describe()} in {producer.batches} batches; waiting for "
                "the consumers to catch up")
        catch_up = {}
        for spec, view in views.items():
            got = view.wait_progress(expected.total_bytes, stall_for(expected),
                                     ctx.timeout_for(expected.total_bytes), [procs[spec]])
            catch_up[spec] = (time.monotonic() - stopped_producing
                              if got >= expected.total_bytes else None)
        samples.append(_sample(time.monotonic() - started, producer, procs, views, db0, peaks))
        checks = {spec: match_items(view.items(), expected.files) for spec, view in views.items()}
    finally:
        producer.stop_event.set()
        for proc in procs.values():
            proc.stop()
    headers = ["minute", "files produced"]
    for spec in systems:
        headers += [f"{spec.label} RSS (MiB)", f"{spec.label} in Girder (MiB)"]
    headers.append("Prefect DB growth (MiB)")
    section.headers = ["system", "files produced", "in Girder, complete", "lost", "duplicates",
                       "RSS first → last sample (MiB)", "peak RSS (MiB)",
                       "catch-up after producing stopped (s)"]
    first = samples[1] if len(samples) > 2 else samples[0]  # samples[0] is at the start
    for i, spec in enumerate(systems):
        check = checks[spec]
        section.rows.append([
            spec.label, str(expected.n_files), str(len(check["complete"])),
            str(len(check["missing"]) + len(check["wrong_size"])), str(len(check["duplicates"])),
            f"{first[2 + 2 * i]} → {samples[-1][2 + 2 * i]}", f"{peaks[spec] / MIB:.0f}",
            f"{catch_up[spec]:.1f}" if catch_up[spec] is not None else "never (files lost)"])
    section.extra = ["Samples:", "", md_table(headers, samples), ""]
    for spec, proc in procs.items():
        hint = failure_hint(proc.output())
        if len(checks[spec]["missing"]) + len(checks[spec]["wrong_size"]) and hint:
            section.notes.append(f"{spec.label} lost files; its log says: `{hint}`")
    for row in section.rows:
        section.headline.append(f"{row[0]}: {row[2]} of {row[1]} files in Girder, {row[3]} "
                                f"lost, {row[4]} duplicate(s); RSS {row[5]} MiB.")
    ours = procs[systems[0]]
    ids = flow_run_ids(ours.output())
    time.sleep(3)
    runs, db1 = task_runs(ctx.stack, ids), db_logical_bytes()
    section.notes += _prefect_notes(ctx, samples, db0, db1, runs, expected.n_files,
                                    (tables0, table_bytes()), (rows0, table_rows()))
    section.headline += [note for note in section.notes if note.startswith("Prefect database")]
    section.commands = [f"# {' '.join(ctx.argv)}"] + [
        display_argv(p, ctx.stack, ctx.work) for p in procs.values()] + [
        "# every batch: .venv/bin/girder-upload-stream produce $WORK/soak-batches/bNNNNN "
        f"--config local --topic_name {topic} --quiet"]
    for spec, view in views.items():
        if not ctx.keep:
            view.delete()
        shutil.rmtree(ctx.work / f"out-{view.name}-0", ignore_errors=True)
    ctx.drop_topic(topic)
    return section


def _steady_rate(samples: list[list[str]]) -> float | None:
    """MiB per hour of Prefect database growth between the first sample after start-up
    (minute 1) and the last one taken while producing (the start-up's flow run, its
    first artifacts and the catch-up at the end left out)."""
    steady = [row for row in samples[1:-1] if row[-1] != "n/a"]
    if len(steady) < 2:
        return None
    minutes = float(steady[-1][0]) - float(steady[0][0])
    grown = float(steady[-1][-1]) - float(steady[0][-1])
    return grown / minutes * 60 if minutes > 0 else None


def _prefect_notes(ctx: Context, samples: list[list[str]], db0: int | None, db1: int | None,
                   runs: int | None, n_files: int, tables: tuple[dict, dict],
                   rows: tuple[dict, dict]) -> list[str]:
    """What the soak wrote to the Prefect database: in all, per hour, per task run and
    per file, and which tables took it."""
    if db1 is None or db0 is None:
        return ["Prefect database: not readable (is the stack's Prefect server up?)"]
    grown = db1 - db0
    hours = max(ctx.sizes.soak_minutes / 60, 1e-9)
    steady = _steady_rate(samples)
    notes = [f"Prefect database: +{grown / MIB:.2f} MiB in all, {grown / MIB / hours:.1f} MiB "
             f"per hour of soak" + (f" ({steady:.1f} MiB per hour between minute 1 and the "
                                    "end of producing)" if steady is not None else "")
             + f"; {runs} task runs for {n_files} files, {grown / max(n_files, 1) / KIB:.2f} "
             "KiB per file" + (f", {grown / runs / KIB:.1f} KiB per task run" if runs else "")
             + "."]
    by_table = growth_by_table(*tables, top=20)
    if by_table:
        notes.append("Growth of the Prefect database by table (indexes included): "
                     + ", ".join(f"{name} {size / KIB:.0f} KiB"
                                 for name, size in by_table[:8]) + ".")
        events = sum(size for name, size in by_table if name in EVENT_TABLES)
        rest = sum(size for name, size in by_table if name not in EVENT_TABLES)
        notes.append(
            f"Prefect database, events (the server's event retention trims them: the "
            f"local stack keeps routine task-run and artifact events 1 hour): "
            f"{events / MIB / hours:.1f} MiB per hour; everything else (task runs, states, "
            f"logs, artifacts: kept until their flow run is vacuumed): "
            f"{rest / MIB / hours:.1f} MiB per hour.")
    added = {name: rows[1][name] - rows[0].get(name, 0) for name in rows[1]}
    if added:
        notes.append("Rows added: " + ", ".join(f"{name} {n}" for name, n in added.items())
                     + ".")
    for note in notes:
        ctx.log(f"  {note}")
    return notes


def _sample(elapsed: float, producer: SoakProducer, procs: dict[Spec, Proc],
            views: dict[Spec, GirderView], db0: int | None, peaks: dict[Spec, int]) -> list[str]:
    row = [f"{elapsed / 60:.1f}", str(producer.data.n_files)]
    for spec, proc in procs.items():
        rss = proc.rss_now()
        peaks[spec] = max(peaks[spec], proc.peak_rss, rss)
        row += [f"{rss / MIB:.0f}", f"{views[spec].size() / MIB:.1f}"]
    db = db_logical_bytes()
    row.append(f"{(db - db0) / MIB:.2f}" if db is not None and db0 is not None else "n/a")
    return row
