from __future__ import annotations

import email.utils
import random

import pytest

from tokenbooth.config import CircuitConfig, RetryConfig
from tokenbooth.errors import ErrorType
from tokenbooth.gateway.resilience import Breaker, CircuitState, RetryPolicy, parse_retry_after


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"Retry-After": "2"}, 2.0), ({"retry-after": "0.5"}, 0.5), ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
     ({"Retry-After": "-3"}, 0.0), ({"Retry-After": "soon"}, None), ({}, None)],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(7, abs=1)


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(RetryConfig(backoff_base=0.5, backoff_max=4), random.Random(1))
    for retry, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        delays = [policy.delay(retry, None) for _ in range(300)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) > ceiling * 0.9  # the full range is used


def test_retry_after_is_used_as_given_up_to_the_cap() -> None:
    policy = RetryPolicy(RetryConfig(retry_after_cap=30))
    assert policy.delay(1, 12.0) == 12.0
    assert policy.delay(1, 31.0) is None


@pytest.mark.parametrize(
    ("error_type", "status", "expected"),
    [(ErrorType.RATE_LIMITED, 429, True), (ErrorType.SERVER_ERROR, 500, True), (ErrorType.SERVER_ERROR, 503, True),
     (ErrorType.SERVER_ERROR, 501, False), (ErrorType.CONNECTION, None, True), (ErrorType.TIMEOUT_CONNECT, None, True),
     (ErrorType.TIMEOUT_READ, None, False), (ErrorType.BAD_REQUEST, 400, False), (ErrorType.AUTH, 401, False),
     (ErrorType.INVALID_RESPONSE, None, False)],
)
def test_what_is_retried(error_type: ErrorType, status: int | None, expected: bool) -> None:
    assert RetryPolicy(RetryConfig()).retryable(error_type, status) is expected
    assert RetryPolicy(RetryConfig(on_read_timeout=True)).retryable(ErrorType.TIMEOUT_READ, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_on_consecutive_failures_then_half_opens_and_closes() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    b = Breaker(CircuitConfig(consecutive_failures=3, cooldown=10), changes.append, clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state is CircuitState.CLOSED
    b.failure()
    assert b.state is CircuitState.OPEN and not b.allow()
    clock.now += 9.9
    assert not b.allow() and b.retry_in() == pytest.approx(0.1)
    clock.now += 0.2
    assert b.allow() and b.state is CircuitState.HALF_OPEN
    assert not b.allow()  # one probe at a time
    b.success()
    assert b.state is CircuitState.CLOSED and b.allow()
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = Breaker(CircuitConfig(consecutive_failures=1, cooldown=5), clock=clock)
    b.failure()
    clock.now += 5
    assert b.allow()
    b.failure()
    assert b.state is CircuitState.OPEN and not b.allow()
    clock.now += 5
    assert b.allow()


def test_breaker_opens_on_failure_ratio_over_the_window() -> None:
    clock = Clock()
    b = Breaker(CircuitConfig(consecutive_failures=100, failure_ratio=0.5, min_calls=10, window=60), clock=clock)
    for i in range(9):
        (b.failure if i % 2 else b.success)()
        clock.now += 1
    assert b.state is CircuitState.CLOSED  # 9 calls: below min_calls
    b.failure()
    assert b.state is CircuitState.OPEN  # 5 of 10 failed


def test_old_calls_leave_the_window() -> None:
    clock = Clock()
    b = Breaker(CircuitConfig(consecutive_failures=100, failure_ratio=0.5, min_calls=4, window=10), clock=clock)
    for _ in range(3):
        b.failure()
        b.success()
    clock.now += 20
    for _ in range(3):
        b.success()
    b.failure()
    assert b.state is CircuitState.CLOSED  # 1 of 4 in the window


def test_the_window_holds_a_few_slices_whatever_the_call_rate() -> None:
    clock = Clock()
    b = Breaker(CircuitConfig(consecutive_failures=10**9, failure_ratio=0.9, min_calls=4, window=60), clock=clock)
    for i in range(100_000):  # 1,000 calls/s for 100 s, one in ten failing
        (b.failure if i % 10 == 0 else b.success)()
        clock.now += 0.001
    assert len(b._window) <= 21
    assert 60_000 <= b._calls_in_window <= 63_000
    assert b._failures_in_window * 10 == pytest.approx(b._calls_in_window, abs=10)
    assert b.state is CircuitState.CLOSED


def test_a_disabled_breaker_never_opens() -> None:
    b = Breaker(CircuitConfig(enabled=False, consecutive_failures=1))
    for _ in range(10):
        b.failure()
    assert b.allow()
