"""``make demo``: the project as it is meant to be used, on the local stack.

It registers the two deployments of ``deployments/prefect.yaml`` (``stream`` and
``drain``) in the stack's Prefect server, with the Girder API key in the Secret block
they name, starts a worker of their process work pool (``python3 -m stack.stackctl up
worker``: a background process whose PID is recorded, stopped by ``make
prefect-down``), produces a small sample tree to a new topic and uploads it with a run
of the ``stream`` deployment, picked up by that worker. It then produces a few more
files and leaves them waiting, so that pressing *Run* on a deployment in the UI shows
files landing, and prints the addresses to open: the deployments in the Prefect UI,
the run, and the demo folder in Girder's web client.

Run by the Makefile after ``stackctl up kafka mongo girder prefect``, from the
repository root, with the stack's environment: KAFKA_BOOTSTRAP_SERVERS,
GIRDER_API_URL, GIRDER_API_KEY, PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["SAMPLE_FILES", "WAITING_FILES", "DEMO_COLLECTION", "DEMO_GROUP", "API_KEY_BLOCK",
           "make_sample_tree", "stack_dir", "worker_log", "girder_credentials", "demo_dir",
           "main"]

SAMPLE_FILES = {
    "README.txt": 2_000,
    "run-001/settings.json": 800,
    "run-001/detector/frame-0001.raw": 3_000_000,
    "run-001/detector/frame-0002.raw": 3_000_000,
    "run-002/spectra/échantillon-α.csv": 250_000,
    "run-002/images/overview.tif": 6_500_000,
}
#: Produced after the demo's own run and left in the topic, for a run started in the UI.
WAITING_FILES = {
    "run-003/notes.txt": 1_500,
    "run-003/detector/frame-0001.raw": 2_000_000,
    "run-003/detector/frame-0002.raw": 2_000_000,
}
DEMO_COLLECTION = "Demo"
#: The consumer group of both deployments (``prefect.yaml``'s default, kept).
DEMO_GROUP = "girder-upload-stream"
#: The Secret block ``deployments/prefect.yaml`` names (``girder_api_key_block``).
API_KEY_BLOCK = "girder-api-key"
RUN_TIMEOUT = 300.0


def make_sample_tree(root: Path, files: dict[str, int] = SAMPLE_FILES, seed: int = 7) -> int:
    """Write deterministic sample files under ``root``; returns the total bytes."""
    rng = random.Random(seed)
    total = 0
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def stack_dir() -> Path:
    """The stack's folder, by stackctl's rule (stack/common.py): ``$GUS_STACK_DIR``, else
    ``.stack`` of the checkout (the working folder: ``make demo`` runs from its root)."""
    return Path(os.environ.get("GUS_STACK_DIR") or Path.cwd() / ".stack").resolve()


def worker_log() -> Path:
    """Where ``stackctl up worker`` logs (stack/common.py's ``log_path("worker")``)."""
    return stack_dir() / "logs" / "worker.log"


def girder_credentials() -> Path:
    """The stack's Girder admin credentials (stack/girder.py)."""
    return stack_dir() / "girder" / "credentials.json"


def demo_dir(given: Path | None = None) -> Path:
    """The demo's folder: ``given``, else ``$GUS_DEMO_DIR``, else the stack's ``demo``."""
    return (given or Path(os.environ.get("GUS_DEMO_DIR") or stack_dir() / "demo")).resolve()


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _create_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=60)


def _produce(root: Path, topic: str) -> None:
    from girder_upload_stream.wire.config import load_config
    from girder_upload_stream.wire.config_files import resolve_config_path
    from girder_upload_stream.wire.producer import produce_path
    settings = load_config(resolve_config_path("local")).producer_settings()
    _say(produce_path(root, settings, topic).describe())


def _start_worker(repo: Path, log: Path) -> subprocess.Popen:
    """``stackctl up worker`` in the background (it waits until the worker is online)."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stack.stackctl", "up", "worker"],
                                cwd=repo, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def _register(repo: Path, work: Path, topic: str) -> tuple[subprocess.Popen, Any]:
    """Pool and Secret block now; ``prefect deploy`` and the worker start in the
    background (both spend most of their time importing). Returns both processes."""
    worker = _start_worker(repo, work / "worker-start.log")  # it makes the pool if missing
    from girder_upload_stream.prefect_glue import deploying
    from girder_upload_stream.prefect_glue.secrets import save_api_key_block
    deploying.ensure_process_pool()
    save_api_key_block(API_KEY_BLOCK, os.environ["GIRDER_API_KEY"])
    return deploying.start_deploy(repo, log=work / "deploy.log"), worker


def _finish_registering(deploy, worker, work: Path, topic: str) -> dict[str, Any]:
    """Wait for both; point the deployments' defaults at the demo's topic and folder.
    Returns the deployments' ids by name."""
    from girder_upload_stream.prefect_glue import deploying
    deploying.finish_deploy(deploy, work / "deploy.log")
    demo = {"topic_name": topic, "collection_name": DEMO_COLLECTION,
            "consumer_group_id": DEMO_GROUP, "output_dir": str(work / "output")}
    ids = {name: deploying.set_parameter_defaults(f"{deploying.FLOW_NAME}/{name}", demo)
           for name in deploying.DEPLOYMENTS}
    if worker.wait(timeout=180) != 0:
        raise RuntimeError("the worker did not start:\n"
                           + (work / "worker-start.log").read_text(errors="replace")[-3000:])
    _say(f"deployments {', '.join(deploying.DEPLOYMENTS)} registered (work pool "
         f"{deploying.WORK_POOL!r}, API key in the Secret block {API_KEY_BLOCK!r}); "
         f"worker running, log {worker_log()}")
    return ids


def _run_stream() -> tuple[Any, float]:
    """One run of the ``stream`` deployment that stops once the topic is drained."""
    from prefect.deployments import run_deployment
    from girder_upload_stream.prefect_glue import deploying
    started = time.monotonic()
    flow_run = run_deployment(f"{deploying.FLOW_NAME}/stream", timeout=RUN_TIMEOUT,
                              parameters={"max_idle_seconds": 3})
    return flow_run, time.monotonic() - started


def _landed(topic: str) -> dict[str, str]:
    """The files the group's runs put in Girder, from the recent-uploads artifact:
    relative path -> Girder item id."""
    from prefect.artifacts import Artifact
    from girder_upload_stream.registry.artifact_content import artifact_keys
    artifact = Artifact.get(artifact_keys(topic, DEMO_GROUP).recent_uploads)
    rows = json.loads(artifact.data) if artifact is not None else []
    return {row["rel_filepath"]: row["item_id"] for row in rows}


def _demo_folder_id(topic: str) -> str:
    from girder_upload_stream.girder.store import GirderStore
    from girder_upload_stream.settings import GirderSettings
    settings = GirderSettings(api_url=os.environ["GIRDER_API_URL"],
                              api_key=os.environ["GIRDER_API_KEY"],
                              collection_name=DEMO_COLLECTION)
    return GirderStore(settings, topic).check()


def _tell(topic: str, flow_run, seconds: float, ids: dict[str, Any], landed: dict[str, str],
          size: int, work: Path) -> None:
    from girder_upload_stream.prefect_glue import deploying
    web = os.environ["GIRDER_API_URL"].removesuffix("/").removesuffix("/api/v1")
    busy = flow_run.total_run_time.total_seconds()
    _say(f"{len(set(SAMPLE_FILES) & set(landed))} of {len(SAMPLE_FILES)} files "
         f"({size / 1e6:.1f} MB) uploaded by the run {flow_run.name!r} of the deployment "
         f"stream: {flow_run.state.name}, {busy:.1f}s running on the worker, {seconds:.1f}s "
         "from the trigger")
    _say(f"Prefect UI, the deployments: {deploying.ui_base_url()}/deployments "
         f"(stream: {deploying.deployment_url(ids['stream'])})")
    _say(f"Prefect UI, this run and its artifacts: {deploying.flow_run_url(flow_run.id)}")
    _say(f"Girder's web client, the demo folder: {web}/#folder/{_demo_folder_id(topic)}")
    _say(f"  the collection {DEMO_COLLECTION!r} was created public, as OpenMSIStream creates "
         "collections, so no log-in is needed to look; to log in: user admin, password in "
         f"{girder_credentials()}")
    _say(f"{len(WAITING_FILES)} more files are waiting in the topic {topic}: open "
         f"{deploying.deployment_url(ids['drain'])}, press Run, and watch them land in the "
         "folder above (drain also runs every 15 minutes by itself)")
    _say(f"registries: {work / 'output' / 'LOGS'}; stop it all: make prefect-down stack-down")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m girder_upload_stream.cli.demo",
        description="What `make demo` runs once the stack is up: register the deployments "
                    "stream and drain of deployments/prefect.yaml (API key in the Secret "
                    "block girder-api-key), start their worker, produce a sample tree to a "
                    "new topic, upload it with a run of stream, leave a few more files "
                    "waiting and print where to look. Run from the repository root with "
                    "the stack's environment (KAFKA_BOOTSTRAP_SERVERS, GIRDER_API_URL, "
                    "GIRDER_API_KEY, PREFECT_API_URL); the stack's folder is $GUS_STACK_DIR, "
                    "else .stack.")
    parser.add_argument("--demo_dir", type=Path, default=None,
                        help="folder of the sample files, logs and the runs' output folder "
                             "(default: $GUS_DEMO_DIR, else demo in the stack's folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repo = Path.cwd()
    work = demo_dir(args.demo_dir)
    work.mkdir(parents=True, exist_ok=True)
    _say(f"working in {work} (the stack's folder: {stack_dir()})")
    topic = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    deploy, worker = _register(repo, work, topic)
    size = make_sample_tree(work / "source")
    _create_topic(os.environ["KAFKA_BOOTSTRAP_SERVERS"], topic)
    _produce(work / "source", topic)
    ids = _finish_registering(deploy, worker, work, topic)
    flow_run, seconds = _run_stream()
    if not flow_run.state.is_final():
        _say(f"the run {flow_run.name!r} is still {flow_run.state.name} after {seconds:.0f}s: "
             "is the worker running (python3 -m stack.stackctl status worker)? Do two "
             "earlier stream runs hold the deployment's concurrency limit?")
        return 1
    landed = _landed(topic)
    make_sample_tree(work / "waiting", WAITING_FILES, seed=8)
    _produce(work / "waiting", topic)
    _tell(topic, flow_run, seconds, ids, landed, size, work)
    return 0 if flow_run.state.is_completed() and set(SAMPLE_FILES) <= set(landed) else 1


if __name__ == "__main__":
    sys.exit(main())
