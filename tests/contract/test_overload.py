"""Retry budget and circuit breaker (contract/overload.py), on a clock the test drives."""

from __future__ import annotations

import pytest

from contract.overload import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_the_reserve_then_a_share_of_calls() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, window_s=10, min_retries=3, clock=clock)
    for _ in range(100):
        budget.record_call()
    retried = sum(budget.try_retry() for _ in range(100))
    assert retried == 3 + 20  # a failing server sees 1.23x its load, not 101x
    clock.now += 10.5  # the window slides: old calls and retries no longer count
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(1.5)


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    states: list[str] = []
    breaker = CircuitBreaker(3, 2.0, clock=clock, on_state_change=states.append)
    for outcome in (False, False, True, False, False):  # a success resets the count
        breaker.before_call()
        breaker.record(outcome)
    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.record(False)
    assert breaker.state == OPEN and states == [OPEN]
    clock.now += 0.5
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.retry_after_s == pytest.approx(1.5) and info.value.retry_after_header == 2
    clock.now += 1.5
    breaker.before_call()  # the probe
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one probe at a time
    breaker.record(False)  # the probe failed: open again, for the full period
    assert breaker.state == OPEN
    clock.now += 2.0
    breaker.before_call()
    breaker.record(True)
    assert breaker.state == CLOSED and states == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_breaker_neutral_outcome_releases_the_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.before_call()
    breaker.record(False)
    clock.now += 1.0
    breaker.before_call()
    breaker.record(None)  # e.g. the caller's own deadline ran out: says nothing about the server
    breaker.before_call()  # a new probe may go
    breaker.record(True)
    assert breaker.state == CLOSED
