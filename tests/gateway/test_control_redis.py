"""Budgets shared through a real Redis: what happens while it is away, and when it comes back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import GatewayHandle, RedisServer, SimHandle
from tests.gateway.test_control import Keyed


@pytest.fixture
def shared(make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path, redis_server: RedisServer,
           monkeypatch: pytest.MonkeyPatch) -> Keyed:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    # 10 USD a month = 200 calls; while Redis is away this replica may spend 10 % of it: 20 calls
    return Keyed(make_gateway, sim, tmp_path, tenants={"acme": {"budgets": ["10/month"]}},
                 redis={"url": redis_server.url, "timeout": 0.2, "retry_interval": 0.2, "outage_credit": 0.1})


def _spent(gw: GatewayHandle, expected: float) -> float:
    """The tenant's spent gauge, once it shows ``expected`` (it follows within a second)."""
    return gw.sample_when("tokenbooth_budget_spent_usd", expected, tenant="acme", window="month")


def test_while_redis_is_gone_a_replica_spends_at_most_its_credit_then_redis_is_reseeded(
        shared: Keyed, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = shared.key()
    gw = shared.start()
    assert [shared.post(secret).status_code for _ in range(2)] == [200, 200]
    assert gw.sample("tokenbooth_redis_up") == 1
    redis_server.stop()
    with caplog.at_level(logging.ERROR, "tokenbooth.control"):
        statuses = [shared.post(secret).status_code for _ in range(30)]
    assert statuses == [200] * 20 + [429] * 10  # 1 USD of credit, 0.05 a call
    assert gw.sample("tokenbooth_redis_up") == 0 and gw.sample("tokenbooth_redis_errors_total") >= 1
    assert sum("Redis is unreachable" in r.getMessage() for r in caplog.records) == 1  # once per outage
    gw.flush()
    redis_server.start()  # empty: no persistence
    time.sleep(0.3)
    assert shared.post(secret).status_code == 200
    assert gw.sample("tokenbooth_redis_up") == 1
    assert shared.post(secret).status_code == 200
    # reseeded from the ledger: 2 + 20 + 1 calls, the outage's not counted twice
    assert _spent(gw, 23 * 0.05) == pytest.approx(23 * 0.05)
    assert sum(r.cost_usd for r in gw.rows()) == Decimal("1.20")


def test_settlements_missed_during_a_hang_are_replayed_once_redis_answers(
        shared: Keyed, redis_server: RedisServer) -> None:
    secret = shared.key()
    gw = shared.start()
    assert shared.post(secret).status_code == 200
    redis_server.pause()  # Redis hangs: connections stay open, nothing answers
    try:
        t0 = time.perf_counter()
        statuses = [shared.post(secret).status_code for _ in range(5)]
        elapsed = time.perf_counter() - t0
    finally:
        redis_server.resume()
    assert statuses == [200] * 5
    assert elapsed < 2  # one wait of redis.timeout, then local answers without waiting
    time.sleep(0.3)
    assert shared.post(secret).status_code == 200  # back: the 5 outage calls are replayed first
    assert shared.post(secret).status_code == 200
    assert _spent(gw, 7 * 0.05) == pytest.approx(7 * 0.05)  # 1 + 5 replayed + 1, each once
    assert gw.sample("tokenbooth_redis_up") == 1
