"""Throughput of the upload flow on the local stack (not part of the test suite).

    eval "$(make -s stack-env)"; make prefect-up
    export PREFECT_API_URL=http://127.0.0.1:24200/api
    .venv/bin/python benchmarks/flow_bench.py --files 1000 --size 65536 --threads 1 4

For each n_threads: a fresh topic (4 partitions) and Girder collection, the producer
runs first (not timed), then the flow consumes until idle. Prints files/s and MB/s from
the consumer's start to the last file in Girder, Girder requests per file, Prefect task
runs per 1,000 files and the growth of the Prefect database per 1,000 files.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import uuid
from pathlib import Path


def make_tree(root: Path, n_files: int, size: int, seed: int = 1) -> None:
    """``n_files`` files of ``size`` bytes in a 3-level tree: 2 x 5 x 10 folders, so
    1,000 files put 10 files in each of 100 leaf folders."""
    rng = random.Random(seed)
    for i in range(n_files):
        leaf = i % 100
        path = (root / f"l1-{leaf // 50}" / f"l2-{(leaf // 10) % 5}" / f"l3-{leaf % 10}"
                / f"f{i:05d}.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def task_runs_of(flow_run_id: str) -> int:
    """Task runs the Prefect server recorded for one flow run (REST count endpoint)."""
    import httpx
    response = httpx.post(f"{os.environ['PREFECT_API_URL']}/task_runs/count",
                          json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=30)
    response.raise_for_status()
    return int(response.json())


def one_run(source: Path, n_files: int, total_bytes: int, threads: int, db: Path | None) -> dict:
    from confluent_kafka.admin import AdminClient, NewTopic

    from girder_upload_stream.wire.config import load_config
    from girder_upload_stream.wire.config_files import resolve_config_path
    from girder_upload_stream.flows.upload_stream import upload_stream
    from girder_upload_stream.wire.producer import produce_path

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"]})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(timeout=60)
    produce_path(source, load_config(resolve_config_path("local")).producer_settings(), topic)
    db_before = db.stat().st_size if db and db.exists() else 0
    state = upload_stream(topic_name=topic, collection_name=f"Bench-{topic}", n_threads=threads,
                          max_idle_seconds=3, output_dir=tempfile.mkdtemp(), return_state=True)
    summary = state.result()
    requests = summary["girder_requests"]
    time.sleep(3)  # let the server record the last task runs before counting
    db_growth = (db.stat().st_size - db_before) if db and db.exists() else 0
    active = summary["active_seconds"]
    runs = task_runs_of(str(state.state_details.flow_run_id))
    assert summary["files_uploaded"] == n_files, summary
    return {"threads": threads, "seconds": active, "files_s": n_files / active,
            "mb_s": total_bytes / 1e6 / active, "requests_per_file": requests / n_files,
            "task_runs_per_1000": runs * 1000 / n_files, "db_mb_per_1000": db_growth / 1e6 * 1000 / n_files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prefect-db", type=Path, default=Path(".stack/prefect/prefect.db"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_tree(Path(tmp), args.files, args.size)
        total = args.files * args.size
        print(f"{args.files} files x {args.size} bytes = {total / 1e6:.1f} MB")
        for threads in args.threads:
            r = one_run(Path(tmp), args.files, total, threads, args.prefect_db)
            print(f"n_threads={r['threads']}: {r['seconds']:.1f}s, {r['files_s']:.1f} files/s, "
                  f"{r['mb_s']:.1f} MB/s, {r['requests_per_file']:.2f} Girder requests/file, "
                  f"{r['task_runs_per_1000']:.0f} task runs/1000 files, "
                  f"Prefect DB +{r['db_mb_per_1000']:.2f} MB/1000 files", flush=True)


if __name__ == "__main__":
    main()
