"""The adaptive limit on uploads in flight (girder_upload_stream/loop/concurrency.py),
driven by a fake clock: it grows while Girder keeps up, backs off when Girder's
latency grows or it refuses uploads, and stays within its bounds."""

from __future__ import annotations

import threading

import pytest

from girder_upload_stream.loop.concurrency import AdaptiveLimit, InFlightGate
from tests.unit.fakes import Clock


def _round(limit: AdaptiveLimit, clock: Clock, seconds: float, ok: bool = True,
           saturated: bool = True) -> int:
    """One round's worth of finished uploads, each ``seconds`` long."""
    for _ in range(max(limit.round_samples, limit.limit)):
        clock.now += seconds / 4
        limit.record(seconds, ok, saturated)
    return limit.limit


def test_grows_by_doubling_while_latency_holds_then_stops_at_the_maximum():
    clock = Clock()
    limit = AdaptiveLimit(2, maximum=16, clock=clock)
    seen = [_round(limit, clock, 0.1) for _ in range(5)]
    assert seen == [4, 8, 16, 16, 16]
    assert limit.snapshot().highest == 16


def test_does_not_grow_when_the_uploads_never_filled_the_limit():
    clock = Clock()
    limit = AdaptiveLimit(2, maximum=16, clock=clock)
    for _ in range(5):
        _round(limit, clock, 0.1, saturated=False)
    assert limit.limit == 2


def test_latency_growth_lowers_the_limit_and_ends_slow_start():
    clock = Clock()
    limit = AdaptiveLimit(2, maximum=64, clock=clock)
    _round(limit, clock, 0.1)       # baseline 0.1 s; 4
    _round(limit, clock, 0.12)      # within tolerance; 8
    assert limit.limit == 8
    assert _round(limit, clock, 0.3) == 6   # 3x the baseline: Girder queues our requests
    assert limit.snapshot().decreases_for_latency == 1
    assert _round(limit, clock, 0.1) == 7   # additive growth from now on, not doubling
    assert _round(limit, clock, 0.1) == 8


def test_a_refused_upload_halves_the_limit_at_once_and_once_per_round():
    clock = Clock()
    limit = AdaptiveLimit(16, maximum=16, clock=clock)
    assert limit.record(0.1, ok=False, saturated=True) == 8
    assert limit.record(0.1, ok=False, saturated=True) == 8  # same round: not again
    for _ in range(10):
        limit.record(0.1, ok=True, saturated=True)  # ends the round
    assert limit.record(0.1, ok=False, saturated=True) == 4
    assert limit.snapshot().decreases_for_errors == 2


def test_a_failing_girder_drives_the_limit_to_the_minimum_and_no_lower():
    clock = Clock()
    limit = AdaptiveLimit(16, minimum=1, maximum=16, clock=clock)
    for _ in range(20):
        _round(limit, clock, 5.0, ok=False)
    assert limit.limit == 1
    assert limit.snapshot().lowest == 1


def test_a_round_ends_after_round_seconds_even_with_few_uploads():
    clock = Clock()
    limit = AdaptiveLimit(8, maximum=16, clock=clock)
    limit.record(0.1, True, True)
    assert limit.limit == 8      # one upload of 8: the round goes on
    clock.now += limit.round_seconds
    assert limit.record(0.1, True, True) == 16


def test_the_baseline_forgets_rounds_older_than_baseline_seconds():
    clock = Clock()
    limit = AdaptiveLimit(2, maximum=2, clock=clock)
    _round(limit, clock, 0.05)
    assert limit.baseline() == pytest.approx(0.05)
    clock.now += limit.baseline_seconds + 1
    _round(limit, clock, 0.2)  # the link got slower for good: a new baseline, no cut
    assert limit.baseline() == pytest.approx(0.2)
    assert limit.snapshot().decreases_for_latency == 0


def test_bounds_are_checked_and_the_initial_limit_is_clamped():
    with pytest.raises(ValueError):
        AdaptiveLimit(2, minimum=0)
    with pytest.raises(ValueError):
        AdaptiveLimit(2, minimum=4, maximum=2)
    assert AdaptiveLimit(50, maximum=16).limit == 16
    assert AdaptiveLimit(0, minimum=1).limit == 1


def test_gate_never_lets_more_in_than_the_limit():
    clock = Clock()
    gate = InFlightGate(AdaptiveLimit(2, maximum=2, clock=clock), clock=clock)
    first, second = gate.acquire(), gate.acquire()
    entered = threading.Event()

    def third() -> None:
        token = gate.acquire()
        entered.set()
        gate.release(token, True)

    waiter = threading.Thread(target=third)
    waiter.start()
    assert not entered.wait(0.2)   # both slots taken: the third waits
    assert gate.in_flight == 2
    gate.release(first, True)
    assert entered.wait(5)
    waiter.join(5)
    gate.release(second, None)     # did not reach Girder: not a sample
    assert gate.in_flight == 0 and gate.max_in_flight == 2


def test_gate_marks_uploads_that_started_with_the_limit_full():
    clock = Clock()
    gate = InFlightGate(AdaptiveLimit(1, maximum=1, clock=clock), clock=clock)
    first = gate.acquire()
    assert first[1] is False            # a free slot
    got = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire()))
    waiter.start()
    while gate._waiting == 0:           # the second one waits for the slot
        threading.Event().wait(0.01)
    gate.release(first, True)
    waiter.join(5)
    assert got and got[0][1] is True    # it found the limit full: a sign to grow


def _gated_uploads(gate: InFlightGate, clock: Clock, per_request: float,
                   requests: list[int], counted: bool = True) -> None:
    """Uploads one after the other, each making ``requests[i]`` Girder requests of
    ``per_request`` seconds, all started with the limit full (a sign to grow);
    ``counted`` False: the gate is not told how many requests each made."""
    for n in requests:
        gate.in_flight += 1  # as acquire() would
        started = (clock.now, True)
        clock.now += per_request * n
        gate.release(started, True, requests=n if counted else 1)


@pytest.mark.parametrize("counted", [True, False])
def test_uploads_that_make_more_requests_are_not_read_as_girder_queueing(counted):
    # Girder answers every request in 0.2 s. After a hand-over, uploads also look
    # for a twin and make folders (5 requests instead of 2): 2.5x as long per upload.
    clock = Clock()
    gate = InFlightGate(AdaptiveLimit(2, maximum=16, clock=clock), clock=clock)
    _gated_uploads(gate, clock, 0.2, [2] * 8)
    _gated_uploads(gate, clock, 0.2, [5, 5, 2] * 20, counted)
    cuts = gate.limit.snapshot().decreases_for_latency
    if not counted:  # per upload, the same Girder looks 2.5x slower: the limit falls
        assert cuts >= 1 and gate.limit.limit < 16
        return
    assert cuts == 0 and gate.limit.limit == 16
    # Girder itself slows down (each request 3x longer): the limit is cut.
    _gated_uploads(gate, clock, 0.6, [2] * 16)
    assert gate.limit.snapshot().decreases_for_latency >= 1


def test_the_request_tally_counts_this_threads_requests_only():
    from girder_upload_stream.request_tally import note_request, requests_made
    before = requests_made()
    note_request()
    note_request()
    other: list[int] = []
    thread = threading.Thread(target=lambda: (note_request(), other.append(requests_made())))
    thread.start()
    thread.join(5)
    assert requests_made() - before == 2 and other == [1]
