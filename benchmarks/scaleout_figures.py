"""The arithmetic of scenarios 10 and 11 of ``make bench`` (issue 23), kept pure so it
can be unit-tested: the steady-state rate of a run, where its CPU went, and the ceiling
that the machine puts on a group of consumers.

Why a ceiling: on a machine of two cores that also runs Kafka, Girder, its database
and the benchmark's delaying proxy, a group of consumers cannot go faster than the
cores allow whatever its members do. If everything but our consumers costs ``c``
CPU-seconds per file, the machine cannot put more than ``cores / c`` files per second
in Girder even with consumers that cost nothing: that is :attr:`RunCpu.ceiling`. Girder
is also one Python process (one interpreter lock): about one core at most, so it cannot
take more than ``1 / g`` files/s if it costs ``g`` CPU-seconds per file
(:attr:`RunCpu.girder_ceiling`). The best ratio ``N`` processes can show against one
on this machine is then ``min(ceilings, N x one's rate) / one's rate``
(:func:`best_ratio`), the figure to read the measured ratio against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["steady_rate", "RunCpu", "best_ratio", "median_or_none", "percentile",
           "beyond_delay_ms"]


def steady_rate(landed: list[float], low: float = 0.1, high: float = 0.9) -> float | None:
    """Files/s between the moment a share ``low`` of the files had landed and the
    moment a share ``high`` had (epoch seconds of each file, any order): the rate once
    the start-up and the group's first rebalances are over and before the last few
    files trail in. None when too few files or no time between the two moments."""
    times = sorted(landed)
    first, last = max(1, math.ceil(low * len(times))), math.ceil(high * len(times))
    if last <= first:
        return None
    span = times[last - 1] - times[first - 1]
    return (last - first) / span if span > 0 else None


@dataclass
class RunCpu:
    """The CPU-seconds (user + system) spent over one run's span, by whom.

    ``consumers``: each process under test (ours, or the girder-client limit);
    ``services``: the stack's services by name (``girder``, ``mongo`` the database,
    ``kafka``); ``harness``: the benchmark's own process (the delaying proxy runs in it
    as threads, with its samplers and its polling of Girder); ``producer``: the
    producer process when it ran inside the span (joined runs), else 0; ``busy``: the
    machine's busy share over the span (all cores, from /proc/stat, so other users of a
    shared machine count too)."""

    span_s: float
    files: int
    consumers: list[float]
    services: dict[str, float] = field(default_factory=dict)
    harness: float = 0.0
    producer: float = 0.0
    busy: float = float("nan")
    cores: int = 2
    #: what the machine did outside the run over it (:func:`benchmarks.cpu_census.spent`:
    #: ``others`` processes, ``kernel threads``, ``interrupts``, ``steal``); empty: unknown
    outside: dict[str, float] = field(default_factory=dict)

    @property
    def consumers_total(self) -> float:
        return sum(self.consumers)

    @property
    def girder_db(self) -> float:
        """Girder's and its database's CPU-seconds."""
        return self.services.get("girder", 0.0) + self.services.get("mongo", 0.0)

    @property
    def not_consumers(self) -> float:
        """Everything measured but the processes under test."""
        return sum(self.services.values()) + self.harness + self.producer

    @property
    def unaccounted(self) -> float:
        """CPU-seconds the machine was busy beyond what was measured: other users'
        processes, the kernel's threads (0 when the busy share is unknown)."""
        if math.isnan(self.busy):
            return 0.0
        return max(0.0, self.busy * self.cores * self.span_s - self.consumers_total
                   - self.not_consumers)

    def per_file(self, cpu_s: float) -> float | None:
        return cpu_s / self.files if self.files else None

    @property
    def ceiling(self) -> float | None:
        """Files/s the cores allow if our consumers cost nothing: ``cores`` divided by
        the CPU-seconds per file of everything else measured (None: nothing measured)."""
        per_file = self.per_file(self.not_consumers)
        return self.cores / per_file if per_file else None

    @property
    def girder_ceiling(self) -> float | None:
        """Files/s Girder allows by itself: it is one Python process, whose threads
        share one interpreter lock, so it works on about one core at most whatever the
        cores: one CPU-second divided by Girder's CPU-seconds per file."""
        per_file = self.per_file(self.services.get("girder", 0.0))
        return 1.0 / per_file if per_file else None

    @property
    def taken_by_others(self) -> float:
        """CPU-seconds other users took from the run: other processes and the
        hypervisor's steal when the census is known, else all that was not measured;
        never more than what the machine was busy with beyond the measured processes."""
        if not self.outside:
            return self.unaccounted
        taken = self.outside.get("others", 0.0) + self.outside.get("steal", 0.0)
        return taken if math.isnan(self.busy) else min(taken, self.unaccounted)

    @property
    def ceiling_left(self) -> float | None:
        """The same with only the cores others left over the run
        (:attr:`taken_by_others`): what a shared machine allowed this run."""
        per_file = self.per_file(self.not_consumers)
        if not per_file or self.span_s <= 0:
            return None
        return max(0.0, self.cores - self.taken_by_others / self.span_s) / per_file


def best_ratio(processes: int, one_rate: float | None, *ceilings: float | None
               ) -> float | None:
    """The best ``processes``-process rate over one process's this machine allows:
    ``min(ceilings..., processes x one_rate) / one_rate`` (unknown ceilings left out)."""
    if not one_rate:
        return None
    return min([processes * one_rate] + [c for c in ceilings if c is not None]) / one_rate


def median_or_none(values) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values``, nearest rank (None when empty)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def beyond_delay_ms(latencies: list[float], delay: float) -> tuple[float | None, float | None]:
    """Median and 90th percentile, in ms, of each request's time in the delaying proxy
    beyond its delay: Girder's answer plus the proxy's forwarding, the part that grows
    when Girder (or the proxy) is the bottleneck shared by several consumers."""
    beyond = [(seconds - delay) * 1000 for seconds in latencies]
    return percentile(beyond, 0.5), percentile(beyond, 0.9)
