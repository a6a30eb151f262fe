"""How many small-file uploads may be in flight to Girder at once: an adaptive limit.

A Girder far away spends most of each upload waiting on round trips, so a fixed
number of upload workers (``--n_threads``) leaves both ends idle; a Girder that is
overloaded or failing must not be sent more. :class:`AdaptiveLimit` decides, from
the uploads that finish, as TCP's congestion control and Netflix's concurrency-limits
(Vegas/Gradient limits) or Envoy's adaptive concurrency filter do:

* uploads are looked at in rounds of about one limit's worth of finished uploads
  (at least :attr:`AdaptiveLimit.round_samples`, at most :attr:`AdaptiveLimit.round_seconds`
  apart, so a round is about one round trip);
* a round with an upload that Girder refused for load (429, 5xx) or could not be
  reached halves the limit (never below ``minimum``): it is at once what the
  uploads of the run can give back;
* latency is an upload's time per Girder request it made (:class:`InFlightGate`):
  an upload that also looks for a twin, makes a folder or finds its item takes two
  or three times as long with Girder no slower. Measured per upload, the members of
  a group started together (whose hand-overs make them check every file for a twin)
  read that as queueing: in scenario 11 of docs/benchmarks.md they cut their limits
  to 1-2 (11 cuts for latency in a run); per request, none;
* a round whose mean latency exceeds ``tolerance`` times the baseline (the lowest
  round mean of the last ``baseline_seconds``: Girder's latency without our queue)
  lowers the limit by a fifth: Girder is queueing our requests, more in flight would
  only wait longer;
* otherwise, if the round filled the limit (uploads were waiting for a slot), the
  limit grows: doubling until the first decrease (slow start), by one per round after;
* it stays within ``minimum`` and ``maximum`` throughout.

Pure logic and a clock passed in (unit tests drive it with a fake one); the
thread-safe slots around it are :class:`InFlightGate`. No Prefect, Kafka or Girder
import.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "InFlightGate", "LimitSnapshot"]


@dataclass(frozen=True)
class LimitSnapshot:
    """What the limit went through so far (for the run's summary and the benchmarks)."""

    limit: int
    lowest: int
    highest: int
    decreases_for_errors: int
    decreases_for_latency: int
    baseline_seconds: float | None


class AdaptiveLimit:
    """The limit on uploads in flight, updated from each finished upload's latency
    and whether Girder answered it well (see the module's text)."""

    round_samples: int = 4
    round_seconds: float = 2.0
    tolerance: float = 2.0
    baseline_seconds: float = 30.0
    latency_decrease: float = 0.8
    error_decrease: float = 0.5

    def __init__(self, initial: int, minimum: int = 1, maximum: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= maximum ({maximum})")
        self.minimum, self.maximum, self._clock = minimum, maximum, clock
        self._limit = float(min(max(initial, minimum), maximum))
        self._slow_start = True
        self._rounds: deque[tuple[float, float]] = deque()  # (end time, mean latency)
        self._start_round(clock())
        self._lowest = self._highest = self.limit
        self._error_cuts = self._latency_cuts = 0

    @property
    def limit(self) -> int:
        return int(self._limit)

    def baseline(self) -> float | None:
        """Girder's latency without our queue: the lowest round mean lately."""
        return min((mean for _, mean in self._rounds), default=None)

    def snapshot(self) -> LimitSnapshot:
        return LimitSnapshot(self.limit, self._lowest, self._highest, self._error_cuts,
                             self._latency_cuts, self.baseline())

    def record(self, seconds: float, ok: bool, saturated: bool) -> int:
        """One finished upload: its ``seconds``, ``ok`` False when Girder refused it for
        load or could not be reached, ``saturated`` True when it started with every
        slot taken or others waiting for one. Returns the limit now."""
        self._samples += 1
        self._latency_sum += seconds
        self._errors += not ok
        self._saturated |= saturated
        now = self._clock()
        if self._errors and not self._cut_this_round:
            self._cut(self.error_decrease)  # at once: a failing Girder gets less at once
            self._error_cuts += 1
            self._cut_this_round = True
        enough = self._samples >= max(self.round_samples, self.limit)
        if enough or (now - self._round_started >= self.round_seconds and self._samples):
            self._end_round(now)
        return self.limit

    def _end_round(self, now: float) -> None:
        mean = self._latency_sum / self._samples
        if not self._errors:  # latencies of a failing round say little about queueing
            self._rounds.append((now, mean))
        while self._rounds and now - self._rounds[0][0] > self.baseline_seconds:
            self._rounds.popleft()
        baseline = self.baseline()
        if self._cut_this_round:
            pass  # already lowered for errors in this round
        elif baseline is not None and mean > self.tolerance * baseline:
            self._cut(self.latency_decrease)
            self._latency_cuts += 1
        elif self._saturated:
            self._grow()
        self._start_round(now)

    def _cut(self, factor: float) -> None:
        self._slow_start = False
        self._limit = max(float(self.minimum), min(self._limit * factor, self._limit - 1))
        self._lowest = min(self._lowest, self.limit)

    def _grow(self) -> None:
        step = self._limit if self._slow_start else 1.0
        self._limit = min(float(self.maximum), self._limit + step)
        self._highest = max(self._highest, self.limit)

    def _start_round(self, now: float) -> None:
        self._round_started = now
        self._samples, self._latency_sum, self._errors = 0, 0.0, 0
        self._saturated = False
        self._cut_this_round = False


class InFlightGate:
    """Slots for uploads in flight, as many as an :class:`AdaptiveLimit` allows:
    ``with gate.slot() as done: ...; done(ok)``. Thread-safe; ``in_flight`` and
    ``max_in_flight`` say how many were taken (the latter never exceeds the
    limit's ``maximum``)."""

    def __init__(self, limit: AdaptiveLimit, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.limit = limit
        self._clock = clock
        self._cond = threading.Condition()
        self.in_flight = 0
        self.max_in_flight = 0
        self._waiting = 0

    def acquire(self) -> tuple[float, bool]:
        """Wait for a free slot; returns (start time, whether the gate was full)."""
        with self._cond:
            saturated = self._waiting > 0 or self.in_flight >= self.limit.limit
            self._waiting += 1
            try:
                while self.in_flight >= self.limit.limit:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._clock(), saturated or self._waiting > 0

    def release(self, started: tuple[float, bool], ok: bool | None,
                requests: int = 1) -> None:
        """Give the slot back; ``ok`` None: the upload said nothing about Girder's load
        (it did not reach Girder), so it is not counted. ``requests``: the Girder
        requests the upload made; the limit learns the time per request."""
        with self._cond:
            self.in_flight -= 1
            if ok is not None:
                seconds = (self._clock() - started[0]) / max(1, requests)
                self.limit.record(seconds, ok, started[1])
            self._cond.notify_all()
