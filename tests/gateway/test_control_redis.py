"""Budgets shared through a real Redis: what happens while it is away, and when it comes back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayHandle, RedisServer, SimHandle
from tests.gateway.test_control import CHAT, Keyed


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


def test_a_background_response_polled_through_two_replicas_is_charged_once(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    k = Keyed(make_gateway, sim, tmp_path, redis={"url": redis_server.url})
    secret = k.key()
    replicas = [k.start(), k.start()]
    auth = {"authorization": f"Bearer {secret}"}
    created = httpx.post(f"{replicas[0].url}/responses", headers=auth, timeout=10,
                         json={"model": "flat-model", "input": "a haiku", "background": True}).json()
    deadline = time.monotonic() + 5
    while httpx.get(f"{replicas[0].url}/responses/{created['id']}", headers=auth).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for gw in replicas * 2:  # each replica reads the finished response twice more
        assert httpx.get(f"{gw.url}/responses/{created['id']}", headers=auth).status_code == 200
    replicas[1].flush()
    rows = replicas[0].rows()  # one ledger for both
    charged = [r for r in rows if r.cost_usd]
    assert len(charged) == 1 and charged[0].cost_usd == Decimal("0.05")  # the first poll that saw it done
    assert len(rows) >= 6 and {r.response_id for r in rows} == {created["id"]}


@pytest.mark.parametrize("fast", [True, False])
def test_far_from_its_limits_a_call_is_admitted_without_waiting_for_redis(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    k = Keyed(make_gateway, sim, tmp_path, tenants={"acme": {"budgets": ["10000/month"]}},
              redis={"url": redis_server.url, "timeout": 0.5, "retry_interval": 0.2, "fast_admission": fast})
    secret = k.key()
    gw = k.start()
    assert k.post(secret).status_code == 200  # waits for Redis: this replica has no view of the budget yet
    redis_server.pause()
    try:
        t0 = time.perf_counter()
        answer = k.post(secret)
        elapsed = time.perf_counter() - t0
    finally:
        redis_server.resume()
    assert answer.status_code == 200
    if fast:  # reserved in Redis without waiting for its answer: 10,000 USD leaves room for far more calls
        assert elapsed < 0.3
    else:  # every admission waits: for the whole redis.timeout, then decided in process
        assert elapsed >= 0.5
    time.sleep(0.6)  # the unanswered admission times out; Redis is retried after retry_interval
    assert [k.post(secret).status_code for _ in range(2)] == [200, 200]
    assert _spent(gw, 3 * 0.05) == pytest.approx(3 * 0.05)  # what the last admission saw: each call once


def test_a_call_admitted_without_waiting_that_redis_finds_past_the_limit_is_counted_and_the_next_is_refused(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    k = Keyed(make_gateway, sim, tmp_path, tenants={"acme": {"budgets": ["1000/month"]}},
              redis={"url": redis_server.url})
    prices = tmp_path / "prices.yaml"
    prices.write_text(prices.read_text() + "  - model: big-model\n    input: 0\n    output: 0\n"
                      "    per_request: 999.87\n")
    secret = k.key()
    a, b = k.start(), k.start()
    assert k.post(secret).status_code == 200  # through b (the last started): b's view has room for 1000 calls
    k.gw = a
    assert k.post(secret).status_code == 200  # a's view too
    big = {**CHAT, "model": "big-model"}
    assert k.post(secret, big).status_code == 200  # a waits (room for one such call, not 1,000): 999.97 spent now
    k.gw = b
    with caplog.at_level(logging.WARNING, "tokenbooth.control"):
        assert k.post(secret).status_code == 200  # b's second-old view says there is room: admitted at once
        b.sample_seen("tokenbooth_admission_overshoot_total")
        refused = k.post(secret)  # Redis said no: b forgot its view and waits now
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert b.sample("tokenbooth_admission_overshoot_total") == 1
    assert sum("went past tenant 'acme'" in r.getMessage() for r in caplog.records) == 1
    a.flush()
    spent = sum(r.cost_usd for r in b.rows())
    assert spent == Decimal("1000.02")  # the limit passed by the one call b let through: the stated bound
