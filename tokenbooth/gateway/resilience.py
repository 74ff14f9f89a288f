"""Staying up when an upstream does not: retry delays, Retry-After, circuit breakers.

Pure logic with an injectable clock; the proxy decides when to call it.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from enum import IntEnum

from tokenbooth.config import CircuitConfig, RetryConfig
from tokenbooth.errors import ErrorType

__all__ = ["Breaker", "CircuitState", "RetryPolicy", "parse_retry_after"]

# Failures worth another attempt. Read timeouts are left out by default: the upstream accepted
# the call and may already be generating (and billing) it.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRYABLE_TYPES = frozenset({ErrorType.CONNECTION, ErrorType.TIMEOUT_CONNECT})
# Failures that count against an upstream's health. A 4xx other than 429 is the caller's fault.
_TRIPPING_TYPES = frozenset({ErrorType.RATE_LIMITED, ErrorType.SERVER_ERROR, ErrorType.CONNECTION,
                             ErrorType.TIMEOUT_CONNECT, ErrorType.TIMEOUT_READ, ErrorType.INVALID_RESPONSE})


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date.

    >>> parse_retry_after({"Retry-After": "2"}), parse_retry_after({"retry-after-ms": "1500"})
    (2.0, 1.5)
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (now if now is not None else time.time()), 0.0)


class RetryPolicy:
    """When to try an upstream again, and how long to wait first."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    def retryable(self, error_type: ErrorType, status: int | None) -> bool:
        if status is not None and status in RETRYABLE_STATUS:
            return True
        if error_type is ErrorType.TIMEOUT_READ:
            return self.config.on_read_timeout
        return error_type in _RETRYABLE_TYPES

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds before retry number ``retry`` (1-based), or None to give up on this upstream.

        Exponential backoff with full jitter; a Retry-After from the upstream is honoured as
        given, unless it is longer than the cap, which means: do not hang, fall back or fail.
        """
        if retry_after is not None:
            return retry_after if retry_after <= self.config.retry_after_cap else None
        ceiling = min(self.config.backoff_max, self.config.backoff_base * 2 ** (retry - 1))
        return self._rng.uniform(0, ceiling)


class CircuitState(IntEnum):
    """The ``tokenbooth_circuit_state`` values."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


_SLICES = 20  # time slices of a breaker's failure-ratio window


class Breaker:
    """A circuit breaker for one upstream.

    Opens after ``consecutive_failures`` failures in a row, or when the failure ratio over the
    last ``window`` seconds reaches ``failure_ratio`` with at least ``min_calls`` calls. While open,
    calls fail fast. After ``cooldown`` seconds one probe is let through (half-open): success
    closes the circuit, failure opens it for another cooldown.

    The window is counted in :data:`_SLICES` time slices, so it covers between ``window`` and
    ``window`` plus one slice, and its memory does not grow with the call rate (one entry per
    call held 600,000 entries, ~60 MB, at 10,000 calls/s).
    """

    def __init__(self, config: CircuitConfig, on_change: Callable[[CircuitState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state = CircuitState.CLOSED
        self._clock = clock
        self._on_change = on_change
        self._consecutive = 0
        self._slice = config.window / _SLICES
        self._window: deque[list[int]] = deque()  # [slice number, calls, failures], oldest first
        self._calls_in_window = 0
        self._failures_in_window = 0
        self._opened_at = 0.0
        self._probe_out = False

    @staticmethod
    def trips(error_type: ErrorType) -> bool:
        """Whether a failure of this type counts against the upstream."""
        return error_type in _TRIPPING_TYPES

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through."""
        return max(self._opened_at + self.config.cooldown - self._clock(), 0.0)

    def allow(self) -> bool:
        """May a call go to this upstream now? A half-open circuit admits one probe at a time."""
        if not self.config.enabled or self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self._clock() - self._opened_at < self.config.cooldown:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def success(self) -> None:
        self._probe_out = False
        self._consecutive = 0
        self._note(False)
        if self.state is not CircuitState.CLOSED:
            self._window.clear()
            self._calls_in_window = self._failures_in_window = 0
            self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        self._probe_out = False
        self._consecutive += 1
        self._note(True)
        if not self.config.enabled:
            return
        if self.state is CircuitState.HALF_OPEN:
            self._open()
            return
        calls = self._calls_in_window
        if self._consecutive >= self.config.consecutive_failures or (
            calls >= self.config.min_calls and self._failures_in_window / calls >= self.config.failure_ratio
        ):
            self._open()

    def release(self) -> None:
        """A call that was let through ended without a verdict (e.g. a 4xx): free the probe slot."""
        self._probe_out = False

    def _note(self, failed: bool) -> None:
        number = int(self._clock() // self._slice)
        window = self._window
        if window and window[-1][0] == number:
            current = window[-1]
        else:
            current = [number, 0, 0]
            window.append(current)
            while window[0][0] < number - _SLICES:
                _, calls, failures = window.popleft()
                self._calls_in_window -= calls
                self._failures_in_window -= failures
        current[1] += 1
        current[2] += failed
        self._calls_in_window += 1
        self._failures_in_window += failed

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)
