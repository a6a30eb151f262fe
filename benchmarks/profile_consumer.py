"""Where our consumer's CPU time goes: one real run under py-spy, summarised.

    python -m benchmarks.profile_consumer                      # 1,000 x 64 KiB, memory mode
    python -m benchmarks.profile_consumer --files 8 --size-kib 65536 --mode disk
    python -m benchmarks.profile_consumer --big --files 8 --size-kib 131072 --partitions 8 \
        --budget-mb 256 --log consumer.log     # issue 22 §3's big-file scenario

Produces a fresh topic (not profiled), then runs ``girder-upload-stream run`` against the
local stack under ``py-spy record`` (all threads, idle waits excluded) until it stops
after ``--max-idle`` seconds without a message, and prints the share of the samples by
the library the sampled code was in (the innermost frame), then the functions with the
most samples, inclusive of what they call. Needs ``py-spy`` (``pip install py-spy``) and
the stack (``make stack-up prefect-up``); the topic and collection are deleted after.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_common import OUR_CLI, REPO_ROOT, load_stack, new_name
from benchmarks.bench_data import big_files, produce, small_tree
from benchmarks.bench_girder import GirderView, delete_topics, girder_client

__all__ = ["main", "summarise"]

#: Innermost-frame path fragments, first match wins: where a sample's time was spent.
AREAS = [
    ("girder_upload_stream", "ours (girder_upload_stream)"),
    ("/prefect/", "Prefect"), ("/pydantic", "Prefect"), ("/sqlalchemy/", "Prefect"),
    ("/httpx/", "HTTP (httpx: Prefect's client)"), ("/httpcore/", "HTTP (httpx: Prefect's client)"),
    ("/anyio/", "Prefect"),
    ("/girder_client/", "Girder client (girder-client, requests)"),
    ("/requests/", "Girder client (girder-client, requests)"),
    ("/urllib3/", "Girder client (girder-client, requests)"),
    ("/http/", "Girder client (girder-client, requests)"),
    ("/confluent_kafka/", "Kafka client"),
    ("/ssl.py", "sockets"), ("/socket.py", "sockets"), ("/selectors.py", "sockets"),
    ("/asyncio/", "asyncio (Prefect's event loop)"),
    ("/importlib/", "imports"), ("<frozen importlib", "imports"),
]


_LINE = re.compile(r":\d+\)$")


def summarise(raw: str, top: int = 25) -> str:
    """A text summary of py-spy's ``--format raw`` output (collapsed stacks + counts)."""
    areas: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        inner = frames[-1]
        areas[next((name for part, name in AREAS if part in inner), "other (stdlib, C)")] += n
        for frame in dict.fromkeys(_LINE.sub(")", f) for f in frames):  # once per stack
            inclusive[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples while busy", "", "by library (innermost frame):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in areas.most_common()]
    out += ["", f"top {top} functions, inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_consumer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size-kib", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--mode", default="memory", choices=["memory", "disk", "both"])
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--max-idle", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw output here")
    parser.add_argument("--big", action="store_true",
                        help="files big-NN.bin at the root (benchmarks' big files)")
    parser.add_argument("--budget-mb", type=int, help="--memory_budget_mb of the consumer")
    parser.add_argument("--log", type=Path, help="keep the consumer's output here")
    parser.add_argument("--no-prefect", action="store_true",
                        help="run the consumer without a Prefect API")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("error: py-spy is not installed (pip install py-spy)")
    stack = load_stack()
    work = Path(tempfile.mkdtemp(prefix="gus-profile-"))
    topic, collection = new_name("profile"), new_name("profile")
    view = GirderView(girder_client(stack), collection)
    try:
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": stack.bootstrap})
        admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(60)
        make = big_files if args.big else small_tree
        data = make(work / "data", args.files, args.size_kib * 1024, seed=9)
        print(produce(stack, data, topic, work / "produce.log"), flush=True)
        raw = work / "profile.txt"
        consumer = [str(OUR_CLI), "run", stack.girder_url, "--config", "local",
                    "--topic_name", topic, "--collection_name", collection,
                    "--n_threads", str(args.n_threads), "--mode", args.mode,
                    "--output_dir", str(work / "out"), "--consumer_group_id", "create_new",
                    "--max_idle_seconds", str(args.max_idle), "--update_seconds", "3600"]
        if args.budget_mb is not None:
            consumer += ["--memory_budget_mb", str(args.budget_mb)]
        env = stack.env()
        if args.no_prefect:
            env.pop("PREFECT_API_URL", None)
            env["PREFECT_HOME"] = str(work / "prefect-home")
        subprocess.run([spy, "record", "--rate", str(args.rate), "--format", "raw",
                        "--output", str(raw), "--", *consumer], env=env,
                       cwd=REPO_ROOT, check=True,
                       stdout=open(args.log, "wb") if args.log else subprocess.DEVNULL,  # noqa: SIM115
                       stderr=subprocess.STDOUT if args.log else None)
        if args.raw:
            shutil.copy2(raw, args.raw)
        print(summarise(raw.read_text(errors="replace"), args.top))
    finally:
        view.delete()
        delete_topics(stack, [topic])
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
