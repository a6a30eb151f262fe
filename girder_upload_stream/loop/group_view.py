"""What an operator sees of the consumer group: for every hop of the run (the consumer
that uploads and, with ``--rekey_by_file``, the hop that re-keys the source topic by
file), the partitions this member holds and how far each is behind its end.

Several processes of one group split the partitions between them; the run's progress
line and its progress artifact then say which partitions this member owns and where it
stands on each, so that an operator can tell a member that is idle (no partitions), one
that is behind (lag on its partitions) and one that is stuck (lag that does not move).

Pure: the per-partition positions and ends come in (the consumer group reads them
from librdkafka's cache, no broker round trip), text and table rows go out. A hop is
anything with a ``view() -> HopView`` method, or a consumer group with
``partition_positions()`` (:func:`view_of_group`); :func:`hop_views` collects them from a
runner: its re-key hop (``runner.rekey``, loop/rekey_hop.py) and its group, the
uploading hop last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from girder_upload_stream.loop.rekey_book import SUFFIX

__all__ = ["HopView", "lag_by_partition", "view_of_group", "hop_views", "format_hop",
           "format_hops", "hop_rows", "partition_list"]

logger = logging.getLogger(__name__)

#: Beyond this many partitions a line gives their ranges and the total lag, not each lag.
MANY_PARTITIONS = 8


@dataclass(frozen=True)
class HopView:
    """One hop of this member: ``name`` (``source``, ``re-key``, ``by-file``), the topic
    it reads in ``group``, and ``lag``: partition -> messages between this member's
    position and the partition's high watermark (None while unknown, e.g. before the
    first fetch of a partition just assigned). No partitions: an idle member."""

    name: str
    topic: str
    group: str
    lag: Mapping[int, int | None]

    @property
    def total_lag(self) -> int | None:
        """The sum of the known lags; None when no partition's lag is known."""
        known = [n for n in self.lag.values() if n is not None]
        return sum(known) if known else None


def lag_by_partition(positions: Mapping[int, tuple[int, int]]) -> dict[int, int | None]:
    """``{partition: (position, high watermark)}`` -> ``{partition: lag}``: high minus
    position, never negative (a position past a cached high watermark is caught up);
    None when either is unknown (librdkafka says -1, or -1001 for "no offset")."""
    return {partition: (max(0, high - position) if position >= 0 and high >= 0 else None)
            for partition, (position, high) in sorted(positions.items())}


def _hop_name(topic: str) -> str:
    """The hop reading the internal topic (``<topic>--<group>--by-file``) is "by-file",
    a hop reading any other topic "source"."""
    return "by-file" if topic.endswith(SUFFIX) else "source"


def view_of_group(group: Any, name: str | None = None) -> HopView | None:
    """The view of a consumer group (``topic``, ``group_id`` and
    ``partition_positions()``, see :class:`~girder_upload_stream.kafka.clients.ConsumerGroup`);
    None when it cannot tell (not connected yet, or a test's fake without them).
    ``name`` defaults to what its topic is: ``by-file`` or ``source``."""
    method = getattr(group, "partition_positions", None)
    if not callable(method):
        return None
    try:
        lag = lag_by_partition(method())
    except Exception as exc:  # noqa: BLE001 - the view is informative only
        logger.debug("the group's lag per partition is unknown: %s", exc)
        return None
    topic = str(getattr(group, "topic", ""))
    return HopView(name or _hop_name(topic), topic, str(getattr(group, "group_id", "") or ""),
                   lag)


def hop_views(runner: Any) -> list[HopView]:
    """Every hop of ``runner``: its re-key hop (``runner.rekey``, an object with
    ``view()``; None without ``--rekey_by_file``), then its own group, the one that
    uploads. Hops that cannot tell now are left out."""
    views: list[HopView] = []
    hop = getattr(runner, "rekey", None)
    if hop is not None:
        try:
            view = hop.view()
        except Exception as exc:  # noqa: BLE001 - informative only
            logger.debug("hop %r has no view now: %s", hop, exc)
        else:
            if isinstance(view, HopView):
                views.append(view)
    last = view_of_group(getattr(runner, "group", None))
    return views + ([last] if last is not None else [])


def partition_list(partitions: Iterable[int]) -> str:
    """``0,1,2,3,5`` -> ``0-3,5`` (runs of three or more become ranges)."""
    numbers = sorted(set(partitions))
    parts: list[str] = []
    start = 0
    while start < len(numbers):
        end = start
        while end + 1 < len(numbers) and numbers[end + 1] == numbers[end] + 1:
            end += 1
        if end - start >= 2:
            parts.append(f"{numbers[start]}-{numbers[end]}")
        else:
            parts.extend(str(n) for n in numbers[start:end + 1])
        start = end + 1
    return ",".join(parts)


def _lag_text(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def format_hop(view: HopView) -> str:
    """``hop by-file: group g--by-file, partitions 0,2 lag 0/15``: the partitions this
    member holds and each one's lag in the same order (``?``: unknown). Beyond
    :data:`MANY_PARTITIONS` partitions, the total and the most behind:
    ``partitions 0-15 lag 40 (most 12 on 7)``; none: ``no partitions``."""
    head = f"hop {view.name}: group {view.group}"
    if not view.lag:
        return f"{head}, no partitions"
    partitions = partition_list(view.lag)
    if len(view.lag) <= MANY_PARTITIONS:
        return f"{head}, partitions {partitions} lag " + "/".join(
            _lag_text(view.lag[p]) for p in sorted(view.lag))
    known = {p: n for p, n in view.lag.items() if n is not None}
    if not known:
        return f"{head}, partitions {partitions} lag ?"
    most = max(sorted(known), key=lambda p: known[p])
    return (f"{head}, partitions {partitions} lag {_lag_text(view.total_lag)} "
            f"(most {known[most]:,} on {most})")


def format_hops(views: Iterable[HopView]) -> str:
    """Every hop's :func:`format_hop`, joined by ``; `` (empty when there is none)."""
    return "; ".join(format_hop(view) for view in views)


def hop_rows(views: Iterable[HopView]) -> list[dict[str, Any]]:
    """One table row per hop and partition (the progress artifact's table):
    ``{"hop", "topic", "group", "partition", "lag"}``, lag None when unknown; a hop
    with no partitions is one row with partition None."""
    rows: list[dict[str, Any]] = []
    for view in views:
        base = {"hop": view.name, "topic": view.topic, "group": view.group}
        if not view.lag:
            rows.append({**base, "partition": None, "lag": None})
        rows += [{**base, "partition": p, "lag": view.lag[p]} for p in sorted(view.lag)]
    return rows
