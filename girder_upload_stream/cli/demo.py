"""``make demo``: produce a small sample tree to the local stack and upload it to Girder
with the flow, then say where the files are and how to see the run in the Prefect UI.

Run by the Makefile after ``make stack-up`` and ``make prefect-up`` (it reads the
stack's environment: KAFKA_BOOTSTRAP_SERVERS, GIRDER_API_URL, GIRDER_API_KEY,
PREFECT_API_URL).
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from pathlib import Path

__all__ = ["make_sample_tree", "main"]

SAMPLE_FILES = {
    "README.txt": 2_000,
    "run-001/settings.json": 800,
    "run-001/detector/frame-0001.raw": 3_000_000,
    "run-001/detector/frame-0002.raw": 3_000_000,
    "run-002/spectra/échantillon-α.csv": 250_000,
    "run-002/images/overview.tif": 6_500_000,
}


def make_sample_tree(root: Path, seed: int = 7) -> int:
    """Write deterministic sample files under ``root``; returns the total bytes."""
    rng = random.Random(seed)
    total = 0
    for rel, size in SAMPLE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def _create_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=60)


def main() -> int:
    from girder_upload_stream.wire.config import load_config
    from girder_upload_stream.wire.config_files import resolve_config_path
    from girder_upload_stream.flows.upload_stream import upload_stream
    from girder_upload_stream.wire.producer import produce_path

    work = Path(os.environ.get("GUS_DEMO_DIR", ".stack/demo"))
    topic = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    source = work / "source"
    size = make_sample_tree(source)
    _create_topic(os.environ["KAFKA_BOOTSTRAP_SERVERS"], topic)
    settings = load_config(resolve_config_path("local")).producer_settings()
    produced = produce_path(source, settings, topic)
    print(f"[demo] {produced.describe()}", flush=True)
    started = time.monotonic()
    summary = upload_stream(topic_name=topic, config="local", collection_name="Demo",
                            n_threads=2, output_dir=str(work / "output"), max_idle_seconds=3)
    seconds = time.monotonic() - started
    busy = max(summary["active_seconds"], 1e-6)
    print(f"[demo] {summary['files_uploaded']} files ({size / 1e6:.1f} MB) uploaded to Girder "
          f"folder /collection/Demo/Demo/{topic}, {busy:.2f}s from the consumer's start to the "
          f"last file in Girder ({summary['files_uploaded'] / busy:.1f} files/s, "
          f"{size / 1e6 / busy:.1f} MB/s; {seconds:.1f}s in all with flow start and idle stop)")
    api = os.environ["GIRDER_API_URL"]
    print(f"[demo] in Girder: {api}/resource/lookup?path=/collection/Demo/Demo/{topic} "
          "(the stack serves Girder's REST API only; its web client is not built)")
    print(f"[demo] registries: {work / 'output' / 'LOGS'}")
    ui = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    print(f"[demo] the flow run is in the Prefect UI: {ui or 'run `make prefect-up` first'}")
    return 0 if summary["files_uploaded"] + summary["files_skipped"] == len(SAMPLE_FILES) else 1


if __name__ == "__main__":
    sys.exit(main())
