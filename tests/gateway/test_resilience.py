"""Retries, Retry-After, fallback chains and circuit breakers against the real simulated upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayHandle, SimHandle
from tokenbooth.gateway.server import bind_socket

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
FAST = {"attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05}



def _post(gw: GatewayHandle, body: dict[str, Any] = CHAT) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat/completions", json=body, timeout=30)


def test_retry_after_is_honoured(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST}])
    sim.script([{"status": 429, "retry_after": 2}, {}])
    t0 = time.perf_counter()
    r = _post(gw)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200 and elapsed >= 2.0
    assert sim.stats()["total"] == 2
    row = gw.rows()[0]
    assert (row.outcome, row.attempts) == ("success", 2)
    assert gw.sample("tokenbooth_upstream_retries_total", upstream="sim", reason="rate_limited") == 1


def test_two_503s_then_200_take_exactly_three_upstream_calls(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST}])
    sim.script([{"status": 503}, {"status": 503}, {}])
    assert _post(gw).status_code == 200
    assert sim.stats()["total"] == 3
    assert gw.rows()[0].attempts == 3
    assert gw.sample("tokenbooth_upstream_retries_total", reason="server_error") == 2


def test_persistent_500_gives_an_openai_error_after_the_configured_attempts(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": {**FAST, "attempts": 4}}])
    sim.faults("500=1")
    r = _post(gw)
    assert r.status_code == 500 and r.json()["error"]["message"] == "simulated 500"
    assert sim.stats()["total"] == 4
    row = gw.rows()[0]
    assert (row.outcome, row.error_type, row.attempts, row.http_status) == ("error", "server_error", 4, 500)


def test_a_retry_after_beyond_the_cap_is_not_waited_for(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": {**FAST, "retry_after_cap": 5}}])
    sim.script([{"status": 429, "retry_after": 120}])
    t0 = time.perf_counter()
    r = _post(gw)
    assert time.perf_counter() - t0 < 2
    assert r.status_code == 429 and r.headers["retry-after"] == "120"  # the client learns when to come back
    assert sim.stats()["total"] == 1


def test_read_timeouts_are_not_retried_by_default_but_connection_failures_are(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST, "timeout": {"read": 0.3}}])
    sim.script([{"fault": "timeout", "seconds": 2}])
    assert _post(gw).status_code == 504
    assert sim.stats()["total"] == 1
    sim.script([{"fault": "reset"}, {}])
    assert _post(gw).status_code == 200
    assert sim.stats()["total"] == 3


def test_a_failing_upstream_opens_its_circuit_and_a_probe_closes_it(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    # the cooldown outlasts the 30 calls even on a slow machine (at 1 s, they sometimes took longer and
    # the 31st call was the half-open probe)
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST,
                        "circuit": {"consecutive_failures": 5, "cooldown": 3.0}}])
    sim.faults("500=1")
    statuses = [_post(gw).status_code for _ in range(30)]
    upstream_calls = sim.stats()["total"]
    assert upstream_calls < 10, f"the upstream saw {upstream_calls} calls; 30 x 3 without a breaker"
    assert statuses.count(503) >= 25  # failing fast while open
    r = _post(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open" and r.headers["retry-after"]
    assert gw.sample("tokenbooth_circuit_state", upstream="sim") == 2
    sim.faults("")
    time.sleep(3.1)
    assert _post(gw).status_code == 200  # the half-open probe
    assert gw.sample("tokenbooth_circuit_state", upstream="sim") == 0
    assert all(_post(gw).status_code == 200 for _ in range(3))


def test_4xx_other_than_429_never_trip_the_breaker(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST,
                        "circuit": {"consecutive_failures": 2}}])
    sim.script([{"status": 400}] * 5)
    assert [_post(gw).status_code for _ in range(5)] == [400] * 5
    assert sim.stats()["total"] == 5  # not retried either
    assert gw.sample("tokenbooth_circuit_state", upstream="sim") == 0


def test_fallback_chain_serves_from_the_healthy_upstream_at_its_price(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Any
) -> None:
    dead = bind_socket("127.0.0.1", 0)  # connections refused
    prices = tmp_path / "p.yaml"
    prices.write_text("models:\n  - {model: b-model, input: 1, output: 2}\n"
                      "  - {model: smart, input: 100, output: 100}\n")
    gw = make_gateway(
        [{"name": "a", "base_url": f"http://127.0.0.1:{dead.getsockname()[1]}/v1", "models": [],
          "retry": FAST},
         {"name": "b", "base_url": sim.url, "models": []}],
        routes={"smart": [{"upstream": "a", "model": "a-model"}, {"upstream": "b", "model": "b-model"}]},
        pricing={"price_file": str(prices)},
    )
    for _ in range(6):
        sim.script([{"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}])
        r = _post(gw, {**CHAT, "model": "smart"})
        assert r.status_code == 200 and r.json()["model"] == "b-model"
    rows = gw.rows()
    assert {(r.upstream, r.model, r.served_model) for r in rows} == {("b", "smart", "b-model")}
    assert {r.cost_usd for r in rows} == {Decimal(1000) * 1 / 10**6 + Decimal(500) * 2 / 10**6}
    assert rows[0].fallback_path == "a:a-model!connection>b:b-model"
    assert gw.sample("tokenbooth_fallbacks_total", from_upstream="a", to_upstream="b") == 6
    # a opened its circuit after 10 straight failed attempts: later calls skipped it without trying
    assert gw.sample("tokenbooth_fallbacks_total", from_upstream="a", reason="circuit_open") >= 1
    # a configured route name is a known model label; the metric carries the model the caller asked for
    assert gw.sample("tokenbooth_requests_total", model="smart", outcome="success", provider="openai") == 6
    dead.close()


def test_total_attempts_never_exceed_the_cap_across_fallbacks(
    make_gateway: Callable[..., GatewayHandle], make_sim: Callable[..., SimHandle]
) -> None:
    a, b, c = make_sim(faults={"503": 1.0}), make_sim(faults={"503": 1.0}), make_sim(faults={"503": 1.0})
    gw = make_gateway(
        [{"name": n, "base_url": s.url, "models": [], "retry": FAST, "circuit": {"enabled": False}}
         for n, s in (("a", a), ("b", b), ("c", c))],
        routes={"m": [{"upstream": "a"}, {"upstream": "b"}, {"upstream": "c"}]},
        max_attempts=5,
    )
    r = _post(gw, {**CHAT, "model": "m"})
    assert r.status_code == 503
    total = sum(s.stats()["total"] for s in (a, b, c))
    assert total == 5, total
    assert (a.stats()["total"], b.stats()["total"], c.stats()["total"]) == (3, 2, 0)
    assert gw.rows()[0].attempts == 5


def test_nothing_is_retried_once_a_stream_has_started(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST}])
    sim.script([{"fault": "break", "usage": {"completion_tokens": 10}}, {}])
    with httpx.stream("POST", f"{gw.url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        raw = resp.read()
    assert b'"error"' in raw
    assert sim.stats()["total"] == 1
    assert gw.rows()[0].attempts == 1


@pytest.mark.parametrize("status", [502, 504])
def test_streams_are_retried_before_they_start(make_gateway: Callable[..., GatewayHandle], sim: SimHandle,
                                               status: int) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST}])
    sim.script([{"status": status}, {}])
    with httpx.stream("POST", f"{gw.url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        raw = resp.read()
    assert resp.status_code == 200 and raw.rstrip().endswith(b"[DONE]")
    assert sim.stats()["total"] == 2


def test_a_reset_after_the_upstream_read_the_request_is_a_counted_retry(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST}])
    assert _post(gw).status_code == 200
    assert len(gw.gateway.proxy.pools["sim"].idle) == 1  # the next call goes out on this kept connection
    sim.script([{"fault": "reset"}, {}])  # the upstream reads the whole request, then drops the connection
    assert _post(gw).status_code == 200
    rows = gw.rows()
    assert [r.attempts for r in rows] == [1, 2]
    assert sim.stats()["total"] == 3 == sum(r.attempts for r in rows)
    assert gw.sample("tokenbooth_upstream_retries_total", upstream="sim", reason="connection") == 1


def test_under_chaos_the_ledger_counts_every_request_the_upstream_received(
    make_gateway: Callable[..., GatewayHandle], make_sim: Callable[..., SimHandle]
) -> None:
    sim = make_sim(faults={"reset": 0.1, "500": 0.05, "429": 0.05}, retry_after=0.01)
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": FAST, "circuit": {"enabled": False}}])

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=16)) as client:
            gate = asyncio.Semaphore(16)

            async def call() -> int:
                async with gate:
                    return (await client.post(f"{gw.url}/chat/completions", json=CHAT)).status_code

            return await asyncio.gather(*(call() for _ in range(400)))

    statuses = asyncio.run(load())
    rows = gw.rows()
    assert len(rows) == 400 and statuses.count(200) > 300
    attempts = sum(r.attempts for r in rows)
    assert sim.stats()["total"] == attempts  # nothing was sent that the ledger does not show
    assert gw.sample("tokenbooth_upstream_retries_total", upstream="sim") == attempts - 400


def test_a_call_refused_while_the_circuit_is_open_records_no_attempt(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "retry": {"attempts": 1},
                        "circuit": {"consecutive_failures": 1, "cooldown": 60}}])
    sim.faults("500=1")
    assert _post(gw).status_code == 500  # the failure that opens the circuit
    r = _post(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
    rows = gw.rows()
    assert [(row.attempts, row.error_type) for row in rows] == [(1, "server_error"), (0, "server_error")]
    assert sim.stats()["total"] == 1
