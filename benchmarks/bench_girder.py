"""What the benchmarks ask Girder and Kafka: is everything in Girder yet, when did each
file land, what is in a consumer group's committed offsets, which messages belong to
which file.

Completion is polled cheaply: Girder keeps a collection's ``size`` (the bytes of every
file below it) up to date as each upload is finalised, so one ``GET collection/{id}``
every 0.2 s says whether all the expected bytes are there. Once they are, the tree is
walked once to check names, sizes and duplicates, and the exact moment the last file
landed is read from Girder's own timestamps (``file.created`` from the assetstore's
file list, ``item.updated`` for metadata set after the upload), so the measured time
does not depend on the polling interval.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from benchmarks.bench_common import BenchError, Proc, Stack, wait_until

__all__ = ["GirderItem", "GirderView", "girder_client", "match_items", "create_topic",
           "delete_topics", "TopicIndex", "key_prefixes", "index_topic", "committed_offsets"]


def girder_client(stack: Stack, api_url: str | None = None):
    from girder_client import GirderClient
    gc = GirderClient(apiUrl=api_url or stack.girder_url)
    gc.authenticate(apiKey=stack.girder_key)
    return gc


def _ts(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else 0.0


@dataclass
class GirderItem:
    """One item below a benchmark collection: its path from the collection, its size,
    and when its content was complete (latest of file creation and item update)."""

    path: str
    item_id: str
    size: int
    landed: float = 0.0
    n_files: int = 0


@dataclass
class GirderView:
    """Looks at one benchmark collection (created by whoever uploads into it)."""

    gc: object
    name: str
    collection_id: str | None = None
    _assetstore: str | None = field(default=None, repr=False)

    #: Every view not deleted yet, so that a failed run's collection is still removed.
    live: ClassVar[list[GirderView]] = []

    def __post_init__(self) -> None:
        GirderView.live.append(self)

    @classmethod
    def delete_all(cls) -> None:
        for view in list(cls.live):
            view.delete()

    def find(self) -> str | None:
        if self.collection_id is None:
            from girder_client import HttpError
            try:
                doc = self.gc.get("resource/lookup",
                                  parameters={"path": f"/collection/{self.name}"})
                self.collection_id = doc["_id"]
            except HttpError:
                return None
        return self.collection_id

    def size(self) -> int:
        """Bytes of all the files in the collection (0 before it exists)."""
        if self.find() is None:
            return 0
        return int(self.gc.get(f"collection/{self.collection_id}")["size"])

    def wait_bytes(self, expected: int, timeout: float, procs: list[Proc] = ()) -> float:
        """Wait until the collection holds at least ``expected`` bytes; the wall time."""
        wait_until(lambda: self.size() >= expected, timeout,
                   f"{expected:,} bytes in Girder collection {self.name}", procs)
        return time.time()

    def wait_progress(self, expected: int, stall: float, timeout: float,
                      procs: list[Proc] = (), start_size: int = 0) -> int:
        """Wait until the collection holds ``expected`` bytes, or has not grown for
        ``stall`` seconds (a consumer that dropped a file will never finish); returns
        the bytes there. A consumer that exits early, or ``timeout``, is an error."""
        deadline = time.monotonic() + timeout
        size, last_growth = start_size, time.monotonic()
        while size < expected:
            for proc in procs:
                proc.check_alive()
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s: {size:,} of {expected:,} "
                                 f"bytes in Girder collection {self.name}")
            if now - last_growth > stall:
                print(f"[bench] collection {self.name}: no new file for {stall:.0f}s with "
                      f"{size:,} of {expected:,} bytes; giving up on the rest", flush=True)
                break
            time.sleep(0.2)
            new = self.size()
            if new > size:
                size, last_growth = new, time.monotonic()
        return size

    def items(self) -> list[GirderItem]:
        """Every item below the collection, with the time its content landed."""
        out: list[GirderItem] = []
        if self.find() is None:
            return out

        def walk(parent: str, parent_type: str, prefix: str) -> None:
            if parent_type == "folder":
                for it in self.gc.listItem(parent):
                    out.append(GirderItem(prefix + it["name"], it["_id"], int(it.get("size", 0)),
                                          _ts(it.get("updated"))))
            for folder in self.gc.listFolder(parent, parentFolderType=parent_type):
                walk(folder["_id"], "folder", f"{prefix}{folder['name']}/")

        walk(self.collection_id, "collection", "")
        self._file_times(out)
        return out

    def _file_times(self, items: list[GirderItem]) -> None:
        """Set ``landed`` and ``n_files`` from the assetstore's newest files (few requests)."""
        by_id = {it.item_id: it for it in items}
        if not by_id:
            return
        if self._assetstore is None:
            self._assetstore = self.gc.get("assetstore")[0]["_id"]
        found, offset, page = 0, 0, max(500, len(by_id) + 100)
        oldest_needed = min(it.landed for it in items) - 3600
        while found < len(by_id):
            files = self.gc.get(f"assetstore/{self._assetstore}/files",
                                parameters={"limit": page, "offset": offset,
                                            "sort": "created", "sortdir": -1})
            for f in files:
                item = by_id.get(f.get("itemId"))
                if item is not None:
                    item.n_files += 1
                    found += 1
                    item.landed = max(item.landed, _ts(f.get("created")))
            if len(files) < page or (files and _ts(files[-1].get("created")) < oldest_needed):
                break
            offset += page

    def delete(self) -> None:
        if self in GirderView.live:
            GirderView.live.remove(self)
        if self.find() is not None:
            try:
                self.gc.delete(f"collection/{self.collection_id}")
            except Exception as exc:  # noqa: BLE001 - clean-up is best effort
                print(f"[bench] could not delete collection {self.name}: {exc}", flush=True)


def match_items(items: list[GirderItem], expected: dict[str, int]) -> dict:
    """Compare what is in Girder with ``{relative path: size}``.

    Consumers may put the tree under different root folders (both consumers in
    ``C/C/<topic>`` by default, the girder-client limit in ``C/<topic>``), so a Girder
    path matches the expected relative path it ends with. Returns the matched items, the missing and wrong-size
    paths, and duplicates (a relative path seen twice, a Girder ``name (1)``, or an item
    holding more than one file)."""
    by_rel: dict[str, list[GirderItem]] = {}
    unexpected = []
    for it in items:
        rel = next((r for r in _suffixes(it.path) if r in expected), None)
        if rel is None:
            unexpected.append(it.path)
        else:
            by_rel.setdefault(rel, []).append(it)
    counts = Counter({rel: len(v) for rel, v in by_rel.items()})
    complete = {rel: next(i for i in v if i.size == expected[rel])
                for rel, v in by_rel.items() if any(i.size == expected[rel] for i in v)}
    wrong = sorted(rel for rel in by_rel if rel not in complete)
    two_files = sorted(it.path for v in by_rel.values() for it in v if it.n_files > 1)
    return {"complete": complete,
            "missing": sorted(set(expected) - set(by_rel)),
            "wrong_size": wrong,
            "wrong_detail": [f"{rel}: expected {expected[rel]:,} bytes, item(s) of "
                             f"{[i.size for i in by_rel[rel]]} bytes with "
                             f"{[i.n_files for i in by_rel[rel]]} file(s)" for rel in wrong],
            "duplicates": sorted([r for r, n in counts.items() if n > 1] + unexpected
                                 + two_files)}


def _suffixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


# --------------------------------------------------------------------------- Kafka

def create_topic(stack: Stack, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=60)


def delete_topics(stack: Stack, topics: list[str]) -> None:
    if not topics:
        return
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    for topic, future in admin.delete_topics(list(topics), operation_timeout=30).items():
        try:
            future.result(timeout=60)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort
            print(f"[bench] could not delete topic {topic}: {exc}", flush=True)


@dataclass
class TopicIndex:
    """Every message of a topic: ``(partition, offset) -> (key, value bytes)``."""

    messages: dict[tuple[int, int], tuple[str, int]]
    end_offsets: dict[int, int]

    def file_of(self, key: str, rel_paths: dict[str, str]) -> str | None:
        """The relative path a message key belongs to (``{key prefix: rel path}``)."""
        prefix = key.rsplit("_chunk_", 1)[0]
        return rel_paths.get(prefix)


def key_prefixes(expected: dict[str, int]) -> dict[str, str]:
    """``{key prefix: rel path}``: a chunk key is the path with ``/`` as ``_``, then
    ``_chunk_i_of_n`` (the OpenMSIStream wire format)."""
    return {rel.replace("/", "_"): rel for rel in expected}


def index_topic(stack: Stack, topic: str, n_expected: int, timeout: float = 300) -> TopicIndex:
    """Read the whole topic once with a plain consumer (keys and value sizes only)."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"{topic}-indexer",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                for p in meta.partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        messages: dict[tuple[int, int], tuple[str, int]] = {}
        deadline = time.monotonic() + timeout
        while len(messages) < n_expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                if msg.error() is None:
                    messages[(msg.partition(), msg.offset())] = (msg.key().decode(),
                                                                 len(msg.value()))
    finally:
        consumer.close()
    if len(messages) < n_expected:
        raise BenchError(f"read {len(messages)} of {n_expected} messages of {topic}")
    return TopicIndex(messages, ends)


def committed_offsets(stack: Stack, group: str, topic: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` (a negative offset: none)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {tp.partition: tp.offset for tp in result.topic_partitions if tp.topic == topic}

