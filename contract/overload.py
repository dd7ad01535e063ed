"""Overload control shared by the gateway (towards TF Serving) and the HTTP client (towards the gateway).

Retrying a failed call is how a short blip becomes an outage: when a server sheds load, every caller
that retries multiplies its load by the number of attempts. Two well-known guards stop that:

* RetryBudget (Finagle's RetryBudget, gRPC's retryThrottling): retries may add at most `ratio` of the
  calls made over a sliding window, plus a small reserve so a caller that makes few calls can still
  retry a blip. A server failing every call therefore sees about (1 + ratio) x its normal load, not
  (1 + max_retries) x.
* CircuitBreaker: after `failures` consecutive failed calls the breaker opens and calls fail at once
  (no network, no server work) for `open_s` seconds; then one probe call is let through (half-open):
  its success closes the breaker, its failure opens it again.

Both are thread-safe (one instance serves all threads of a gunicorn worker or of a client) and take
a clock, so tests can drive time. They live in `contract` because both sides use them and neither
may import the other (tests/test_import_graph.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


class RetryBudget:
    """At most `min_retries + ratio x calls` retries over the last `window_s` seconds."""

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        window_s: float = 10.0,
        min_retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"retry budget ratio must be within 0..1, got {ratio}")
        if window_s <= 0 or min_retries < 0:
            raise ValueError("retry budget window_s must be > 0 and min_retries >= 0")
        self.ratio = ratio
        self.window_s = window_s
        self.min_retries = min_retries
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        for stamps in (self._calls, self._retries):
            while stamps and stamps[0] <= now - self.window_s:
                stamps.popleft()

    def record_call(self) -> None:
        """Count one call (its first attempt): each call earns `ratio` of a retry."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._calls.append(now)

    def try_retry(self) -> bool:
        """True (and the retry is counted) when the budget allows one more retry now."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._retries) + 1 > self.min_retries + self.ratio * len(self._calls):
                return False
            self._retries.append(now)
            return True


class CircuitOpen(Exception):
    """The breaker is open: the call was not made. `retry_after_s` is when a probe will be let through."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"circuit open; next probe in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> int:
        """Whole seconds for an HTTP Retry-After header (at least 1)."""
        return max(1, math.ceil(self.retry_after_s))


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures -> half-open after `open_s` -> one probe.

    Use: `breaker.before_call()` (raises CircuitOpen), then `breaker.record(success)` once the call
    ended. While half-open only one probe is in flight; other callers get CircuitOpen until it ends.
    `on_state_change(state)` is called (outside the lock) on every transition, e.g. to set a metric.
    """

    def __init__(
        self,
        failures: int = 5,
        open_s: float = 2.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str], None] | None = None,
    ) -> None:
        if failures < 1 or open_s <= 0:
            raise ValueError("circuit breaker needs failures >= 1 and open_s > 0")
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            return self._current_state(self._clock())

    def _current_state(self, now: float) -> str:
        if self._state == OPEN and now - self._opened_at >= self.open_s:
            return HALF_OPEN
        return self._state

    def before_call(self) -> None:
        """Return when the call may go ahead; raise CircuitOpen when it must not be made."""
        changed = None
        with self._lock:
            now = self._clock()
            state = self._current_state(now)
            if state == OPEN:
                raise CircuitOpen(self.open_s - (now - self._opened_at))
            if state == HALF_OPEN:
                if self._probe_in_flight:
                    raise CircuitOpen(min(self.open_s, 1.0))  # the probe decides; look again soon
                self._probe_in_flight = True
                if self._state != HALF_OPEN:
                    self._state = changed = HALF_OPEN
        if changed:
            self._notify(changed)

    def record(self, success: bool | None) -> None:
        """The outcome of a call that before_call let through: True, False, or None when it says
        nothing about the server's health (e.g. the caller's own short deadline ran out)."""
        changed = None
        with self._lock:
            was_probe = self._probe_in_flight
            self._probe_in_flight = False
            if success is None:
                pass
            elif success:
                self._consecutive = 0
                if self._state != CLOSED:
                    self._state = changed = CLOSED
            else:
                self._consecutive += 1
                if was_probe or (self._state == CLOSED and self._consecutive >= self.failures):
                    self._opened_at = self._clock()
                    self._state = changed = OPEN
        if changed:
            self._notify(changed)

    def _notify(self, state: str) -> None:
        if self._on_state_change is not None:
            self._on_state_change(state)
