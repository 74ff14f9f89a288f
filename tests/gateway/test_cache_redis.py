"""The response cache in a real Redis: shared by replicas, and never in the way when Redis is gone."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import GatewayHandle, RedisServer, SimHandle
from tests.gateway.test_cache import CHAT


def _post(gw: GatewayHandle, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat/completions", json={**CHAT, "stream": stream}, timeout=10)


def test_two_gateways_on_one_redis_share_entries(make_gateway: Callable[..., GatewayHandle], sim: SimHandle,
                                                 redis_server: RedisServer) -> None:
    replicas = [make_gateway([{"name": "sim", "base_url": sim.url}], redis={"url": redis_server.url},
                             cache={"enabled": True}) for _ in range(2)]
    first = _post(replicas[0])
    deadline = time.monotonic() + 3  # the store is sent without waiting for Redis's reply
    while redis_server.cli("DBSIZE") != "1" and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _post(replicas[1])
    assert (first.headers["x-tokenbooth-cache"], second.headers["x-tokenbooth-cache"]) == ("miss", "hit")
    assert second.content == first.content and sim.stats()["total"] == 1
    streamed = _post(replicas[0], stream=True)  # a stream too, replayed by the other replica
    while redis_server.cli("DBSIZE") != "2" and time.monotonic() < deadline:
        time.sleep(0.01)
    replayed = _post(replicas[1], stream=True)
    assert replayed.headers["x-tokenbooth-cache"] == "hit" and replayed.content == streamed.content
    assert sim.stats()["total"] == 2
    ttl = int(redis_server.cli("PTTL", redis_server.cli("KEYS", "tb:cache:*").splitlines()[0]))
    assert 3_500_000 < ttl <= 3_600_000  # cache.ttl, as Redis's own expiry
    miss, hit = replicas[0].rows()[0], replicas[1].rows()[0]
    assert (hit.cache, hit.cost_usd, hit.saved_cost_usd) == ("hit", 0, miss.cost_usd)


def test_with_redis_stopped_calls_succeed_as_misses_and_the_failure_is_counted(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, redis_server: RedisServer) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url}], redis={"url": redis_server.url, "retry_interval": 0.2},
                      cache={"enabled": True})
    assert _post(gw).status_code == 200
    redis_server.stop()
    t0 = time.perf_counter()
    answers = [_post(gw) for _ in range(5)]
    assert time.perf_counter() - t0 < 2
    assert [(a.status_code, a.headers["x-tokenbooth-cache"]) for a in answers] == [(200, "miss")] * 5
    assert gw.sample("tokenbooth_cache_errors_total", operation="get") == 5
    assert sim.stats()["total"] == 6
    redis_server.start()  # empty: no persistence
    time.sleep(0.25)  # past redis.retry_interval: the next lookup tries Redis again
    deadline = time.monotonic() + 3
    while _post(gw).headers["x-tokenbooth-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_hung_redis_costs_one_timeout_then_misses_without_waiting(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, redis_server: RedisServer) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url}], redis={"url": redis_server.url, "retry_interval": 5},
                      cache={"enabled": True, "timeout": 0.1})
    assert _post(gw).status_code == 200
    redis_server.pause()
    try:
        t0 = time.perf_counter()
        answers = [_post(gw) for _ in range(5)]
        elapsed = time.perf_counter() - t0
    finally:
        redis_server.resume()
    assert [a.headers["x-tokenbooth-cache"] for a in answers] == ["miss"] * 5
    assert elapsed < 1  # one wait of cache.timeout, then misses at once
    assert gw.sample("tokenbooth_cache_errors_total", operation="get") == 5


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_backend_follows_redis_url_unless_chosen(make_gateway: Callable[..., GatewayHandle], sim: SimHandle,
                                                     redis_server: RedisServer, backend: str) -> None:
    chosen = make_gateway([{"name": "sim", "base_url": sim.url}], redis={"url": redis_server.url},
                          cache={"enabled": True, **({"backend": "memory"} if backend == "memory" else {})})
    assert chosen.gateway.proxy.cache is not None and chosen.gateway.proxy.cache.backend.name == backend
