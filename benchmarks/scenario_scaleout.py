"""Scenario 5 of issue 6: scale-out. Two consumer processes sharing one consumer group
on an 8-partition topic, against one process: the throughput ratio, and no item in
Girder twice.

Both processes start at once with the same ``--consumer_group_id`` and the same
collection; the time runs from the first start to the last file in Girder. A file
uploaded by both would show as a second item of the same name (Girder names it
``name (1)``) or as the same relative path twice: both count as duplicates. The same is
done for OpenMSIStream, and the limit is run with the same total concurrency (one and
two processes' worth of threads).
"""

from __future__ import annotations

import os
import shutil

from benchmarks.bench_common import KIB, Stat
from benchmarks.bench_config import Context
from benchmarks.bench_data import small_tree
from benchmarks.bench_report import Section, ratio
from benchmarks.bench_systems import Spec
from benchmarks.scenario_throughput import missing_notes, run_matrix

__all__ = ["scenario_scaleout"]


def scenario_scaleout(ctx: Context) -> Section:
    s = ctx.sizes
    n = s.n_threads
    data = small_tree(ctx.work / "scale", s.scale_files, s.scale_size, seed=5)
    section = Section(
        f"5. Scale-out: 2 processes in one consumer group vs 1, {s.scale_partitions} partitions",
        f"{data.describe()} ({s.scale_size // KIB} KiB each, 3-level tree), "
        f"{s.scale_partitions} partitions, `--n_threads {n}` per process, `--mode memory`. "
        "Files/s: higher is better. '× 1 process' compares with the same system in one "
        "process; the limit is run with the same total number of upload threads.")
    specs = [Spec("ours", n), Spec("ours", n, processes=2), Spec("omsi", n),
             Spec("omsi", n, processes=2), Spec("limit", n), Spec("limit", 2 * n)]
    results = run_matrix(ctx, specs, data, "scale", s.scale_partitions)
    rate = {spec: Stat.of(r.files_s for r in results[spec]) for spec in specs}
    section.headers = ["system", "upload threads in all", "files/s", "× 1 process",
                       "× OpenMSIStream (same processes)", "× limit (same threads)",
                       "missing / duplicates", "items in Girder"]
    for spec in specs:
        runs = results[spec]
        threads = spec.n_threads * spec.processes
        single = next(x for x in specs if x.system == spec.system and x.processes == 1
                      and x.n_threads == n)
        omsi = next((x for x in specs if x.system == "omsi" and x.processes == spec.processes),
                    None)
        limit = next(x for x in specs if x.system == "limit"
                     and x.n_threads == threads)
        label = spec.label + (f", {spec.n_threads} threads" if spec.system == "limit" else "")
        section.rows.append([
            label, str(threads), rate[spec].show(),
            ratio(rate[spec], rate[single]) if spec.processes > 1 else "–",
            ratio(rate[spec], rate[omsi]) if spec.system == "ours" and omsi else "–",
            ratio(rate[spec], rate[limit]) if spec.system != "limit" else "–",
            f"{sum(r.missing for r in runs)} / {sum(r.duplicates for r in runs)}",
            ", ".join(str(r.n_files + r.duplicates) for r in runs)])
    two = Spec("ours", n, processes=2)
    section.notes = missing_notes(results)
    section.headline = [
        f"2 processes run at {ratio(rate[two], rate[Spec('ours', n)])} the rate of 1 "
        f"(OpenMSIStream {ratio(rate[Spec('omsi', n, processes=2)], rate[Spec('omsi', n)])}), "
        f"{sum(r.duplicates for r in results[two])} duplicate and "
        f"{sum(r.missing for r in results[two])} missing item(s)."]
    section.notes.append(
        "OpenMSIStream's two processes get their collection made beforehand: each creates "
        "it at start, and the one that loses that race exits with an HTTP 400. Ours need "
        "no help (a collection made by the other process at the same moment is found).")
    section.notes.append(
        f"Duplicates are counted over {len(results[two])} repetition(s). On a machine with "
        f"{os.cpu_count()} cores that also runs Kafka, Girder and the Prefect server, a second "
        "process mostly competes for the same cores.")
    section.commands = [f"# {' '.join(ctx.argv)}"]
    for spec in specs:
        section.commands += [f"# {spec.label}"] + results[spec][0].argv
    shutil.rmtree(data.root, ignore_errors=True)
    return section
