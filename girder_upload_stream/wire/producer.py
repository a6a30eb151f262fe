"""Produce a file or a directory tree as OpenMSIStream chunk messages.

The messages are exactly what OpenMSIStream's ``DataFileUploadDirectory`` sends, so the
real OpenMSIStream consumers and ours both accept them. Sub-folders are relative to the
directory given; a single file is produced at the root (empty ``subdir``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from girder_upload_stream.wire.codec import DEFAULT_CHUNK_SIZE, chunk_file, encode_chunk
from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.kafka.chunk_producer import ChunkProducer

__all__ = ["DEFAULT_UPLOAD_REGEX", "ProduceSummary", "iter_source_files", "produce_path"]

logger = logging.getLogger(__name__)

#: Everything except hidden files or folders (a component starting with ".") and files
#: ending in ".log", matched against the POSIX path relative to the produced directory.
#: This is OpenMSIStream's stated intent; its own pattern also skips any path containing
#: "log" after the first character (e.g. "catalog.txt"), which we do not copy.
DEFAULT_UPLOAD_REGEX = re.compile(r"^(?!\.)(?!.*/\.)(?!.*\.log$).*$")
_MESSAGE_OVERHEAD = 64 * 1024


@dataclass
class ProduceSummary:
    """What one ``produce`` run did, for the final report and the exit code."""

    files: int = 0
    skipped: list[str] = field(default_factory=list)
    failed_files: list[str] = field(default_factory=list)
    chunks: int = 0
    bytes: int = 0
    acked: int = 0
    delivery_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_files and not self.delivery_failures and self.acked == self.chunks

    def describe(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        return (f"produced {self.files} file(s), {self.chunks} chunk(s), {self.bytes:,} bytes "
                f"in {self.seconds:.1f}s ({rate:.1f} MB/s); acknowledged {self.acked}/"
                f"{self.chunks}; {len(self.skipped)} skipped, {len(self.failed_files)} failed, "
                f"{len(self.delivery_failures)} delivery error(s)")


def iter_source_files(root: Path, upload_regex: re.Pattern[str] = DEFAULT_UPLOAD_REGEX
                      ) -> Iterator[tuple[Path, str, str]]:
    """Yield ``(path, rel_subdir, rel_path)`` for every regular file to produce, sorted.

    Symlinked folders are not followed, so a link cannot pull a tree from elsewhere.
    """
    if root.is_file():
        if upload_regex.match(root.name):
            yield root, "", root.name
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        subdir = "" if rel_dir == "." else rel_dir
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel_path = f"{subdir}/{name}" if subdir else name
            if path.is_file() and upload_regex.match(rel_path):
                yield path, subdir, rel_path


def produce_path(root: Path, settings: dict[str, Any], topic: str, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 upload_regex: re.Pattern[str] = DEFAULT_UPLOAD_REGEX,
                 progress: Callable[[ProduceSummary], None] | None = None,
                 encrypt: Callable[[str, bytes, bytes], tuple[bytes, bytes]] | None = None
                 ) -> ProduceSummary:
    """Chunk every selected file under ``root`` and produce it to ``topic``; with
    ``encrypt`` (a KafkaCrypto node's), each key and value is encrypted first.

    A file that cannot be read or has an unsafe name is reported and skipped; the run
    goes on. Returns once the broker has acknowledged (or refused) every chunk.
    """
    settings = dict(settings)
    needed = chunk_size + _MESSAGE_OVERHEAD
    if int(settings.get("message.max.bytes", 1_000_000)) < needed:
        settings["message.max.bytes"] = str(needed)
    producer = ChunkProducer(settings, topic, encrypt=encrypt)
    producer.check_topic()  # one line and no file read when Kafka or the topic is missing
    summary = ProduceSummary()
    started = time.monotonic()
    for path, subdir, rel_path in iter_source_files(root, upload_regex):
        try:
            n_before = summary.chunks
            for chunk in chunk_file(path, subdir, chunk_size):
                key, value = encode_chunk(chunk)
                producer.send(key, value, rel_path=rel_path)
                summary.chunks += 1
                summary.bytes += chunk.size
            if summary.chunks == n_before:
                summary.skipped.append(rel_path)
            else:
                summary.files += 1
        except (GirderUploadStreamError, OSError) as exc:
            logger.error("cannot produce %s: %s", rel_path, exc)
            summary.failed_files.append(f"{rel_path}: {exc}")
        if progress is not None:
            summary.acked = producer.report.acked
            summary.seconds = time.monotonic() - started
            progress(summary)
    report = producer.flush()
    summary.acked = report.acked
    summary.delivery_failures = list(report.failures)
    summary.seconds = time.monotonic() - started
    return summary
