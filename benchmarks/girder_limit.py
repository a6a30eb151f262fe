"""The limit: girder-client uploading a local tree straight into Girder, no Kafka.

    python -m benchmarks.girder_limit SRC_DIR --collection NAME --root_folder NAME \
        [--n_threads 2] [--api_url URL]        # API key from $GIRDER_API_KEY

This is the baseline "how fast could any consumer put these files in Girder on this
machine": the files are already whole on local disk, and it does the minimum a
consumer must do to leave the same thing in Girder. It finds or creates the
collection, creates the root folder and the folder tree (level by level, in
parallel), then uploads every file with a ThreadPoolExecutor of ``--n_threads``
workers, one GirderClient per thread: ``POST item`` (with the sha256 checksum as
metadata, as both consumers set it) and girder-client's ``uploadFileToItem``. Run as a
subprocess by the benchmarks so that its start-up and its RSS count like a consumer's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["upload_tree", "main"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def upload_tree(src: Path, api_url: str, api_key: str, collection: str, root_folder: str,
                n_threads: int) -> tuple[int, int]:
    """Upload every file below ``src``; returns ``(files, bytes)``."""
    from girder_client import GirderClient, HttpError

    local = threading.local()

    def client() -> GirderClient:
        if getattr(local, "gc", None) is None:
            local.gc = GirderClient(apiUrl=api_url)
            local.gc.authenticate(apiKey=api_key)
        return local.gc

    files = sorted(p for p in src.rglob("*") if p.is_file())
    dirs: set[Path] = set()
    for path in files:  # every folder holding a file, and its ancestors
        rel = path.parent.relative_to(src)
        while rel != Path("."):
            dirs.add(rel)
            rel = rel.parent
    folders = sorted(dirs, key=lambda p: (len(p.parts), p.as_posix()))

    gc = client()
    try:
        coll = gc.get("resource/lookup", parameters={"path": f"/collection/{collection}"})
    except HttpError:
        coll = gc.createCollection(collection)
    ids = {Path("."): gc.createFolder(coll["_id"], root_folder, parentType="collection",
                                      reuseExisting=True)["_id"]}
    meta_base = {"OpenMSIStreamVersion": "girder-limit"}
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for depth in sorted({len(f.parts) for f in folders}):
            level = [f for f in folders if len(f.parts) == depth]
            made = pool.map(lambda f: client().createFolder(
                ids[f.parent], f.name, reuseExisting=True, metadata=meta_base)["_id"], level)
            ids.update(zip(level, made))

        def one(path: Path) -> int:
            gc = client()
            size = path.stat().st_size
            item = gc.createItem(ids[path.parent.relative_to(src)], path.name,
                                 metadata={**meta_base, "checksum": {"sha256": _sha256(path)}})
            gc.uploadFileToItem(item["_id"], str(path))
            return size

        total = sum(pool.map(one, files))
    return len(files), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--root_folder", required=True)
    parser.add_argument("--n_threads", type=int, default=2)
    parser.add_argument("--api_url", default=os.environ.get("GIRDER_API_URL"))
    args = parser.parse_args(argv)
    key = os.environ.get("GIRDER_API_KEY")
    if not key or not args.api_url:
        parser.error("set GIRDER_API_KEY (and GIRDER_API_URL or --api_url)")
    started = time.monotonic()
    n, total = upload_tree(args.src, args.api_url, key, args.collection, args.root_folder,
                           args.n_threads)
    seconds = time.monotonic() - started
    print(f"uploaded {n} files, {total:,} bytes in {seconds:.2f}s "
          f"({total / 1e6 / max(seconds, 1e-9):.1f} MB/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
