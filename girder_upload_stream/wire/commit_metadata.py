"""The commit metadata of offsets rules 7 to 9, as text: ``gus1:hw=N`` (the high
watermark), ``;p=`` (the pending spans of ``[C, N)``) and ``;f=`` (the retry spans of
files whose upload failed for good). Each list is written as, per span, its distance
from the previous span's end and its length. Brokers keep 4 KiB of metadata by
default (``offset.metadata.max.bytes``), so both lists are capped.

Pure text handling; the rules themselves are in :mod:`girder_upload_stream.ledger.offsets`.
A format on the wire (what the broker keeps), so it sits in ``wire/``: ``kafka/`` reads
it too without loading the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["TopicPartition", "Span", "MAX_SPANS_CHARS", "MAX_FAILED_CHARS",
           "format_metadata", "parse_metadata", "parse_spans", "parse_failed", "merge_spans",
           "spans_of"]

TopicPartition = tuple[str, int]
Span = tuple[int, int]  # [start, end) of offsets
_METADATA_PREFIX = "gus1:hw="
_SPANS = ";p="
_FAILED = ";f="
#: Longest metadata written (brokers refuse more than offset.metadata.max.bytes, 4096
#: by default): a few hundred spans, and the retry spans of rule 9 beside them.
MAX_SPANS_CHARS = 2000
MAX_FAILED_CHARS = 1500


def format_metadata(high_watermark: int, committed: int | None = None,
                    spans: list[Span] | None = None, failed: list[Span] | None = None) -> str:
    """The commit metadata: the partition's high watermark (rule 7) and, when given,
    the pending spans of ``[committed, high_watermark)`` (rule 8), each written as its
    distance from the previous span's end (or from ``committed``) and its length, and
    the retry spans of files whose upload failed for good (rule 9, from offset 0)."""
    text = f"{_METADATA_PREFIX}{high_watermark}"
    if spans is None or committed is None:
        return text
    tokens, previous, length = [], committed, 0
    for start, end in spans:
        token = f"{start - previous}.{end - start}"
        length += len(token) + 1
        if length > MAX_SPANS_CHARS - 48:
            tokens.append(f"{start - previous}.{high_watermark - start}")  # the cut: to N
            break
        tokens.append(token)
        previous = end
    text += _SPANS + ",".join(tokens)
    if failed:
        text += _FAILED + ",".join(_failed_tokens(failed))
    return text


def _failed_tokens(failed: list[Span]) -> list[str]:
    """Rule 9's list; the newest spans that do not fit are left out (see the docstring)."""
    tokens, previous, length = [], 0, 0
    for start, end in failed:
        token = f"{start - previous}.{end - start}"
        length += len(token) + 1
        if length > MAX_FAILED_CHARS:
            break
        tokens.append(token)
        previous = end
    return tokens


def parse_metadata(metadata: str | None) -> int | None:
    """The high watermark in commit metadata, or None if it is not ours or malformed."""
    if not metadata or not metadata.startswith(_METADATA_PREFIX):
        return None
    text = metadata[len(_METADATA_PREFIX):].split(";", 1)[0]
    return int(text) if text.isdigit() else None


def _parse_list(body: str, origin: int) -> list[Span] | None:
    spans, previous = [], origin
    try:
        for token in filter(None, body.split(",")):
            gap, length = (int(x) for x in token.split("."))
            if gap < 0 or length <= 0:
                return None
            spans.append((previous + gap, previous + gap + length))
            previous += gap + length
    except ValueError:
        return None
    return spans


def parse_spans(metadata: str | None, committed: int) -> list[Span] | None:
    """The pending spans in commit metadata (rule 8); None when there is no list or it
    is malformed, which means "read all of [C, N) again"."""
    high = parse_metadata(metadata)
    if high is None or _SPANS not in metadata:
        return None
    spans = _parse_list(metadata.split(_SPANS, 1)[1].split(";", 1)[0], committed)
    return spans if spans is not None and (not spans or spans[-1][1] <= high) else None


def parse_failed(metadata: str | None) -> list[Span]:
    """The retry spans in commit metadata (rule 9); empty when there are none or the
    list is malformed."""
    high = parse_metadata(metadata)
    if high is None or _FAILED not in metadata:
        return []
    spans = _parse_list(metadata.split(_FAILED, 1)[1].split(";", 1)[0], 0)
    return spans if spans and spans[-1][1] <= high else []


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def spans_of(offsets: Iterable[int]) -> Iterator[Span]:
    """Runs of consecutive offsets, as ``[start, end)`` spans in order."""
    start = end = None
    for offset in sorted(offsets):
        if end is not None and offset == end:
            end += 1
            continue
        if start is not None:
            yield start, end
        start, end = offset, offset + 1
    if start is not None:
        yield start, end
