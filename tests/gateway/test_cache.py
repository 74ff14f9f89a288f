"""The response cache through the gateway: hits answered without the upstream, replayed in the
client's form, recorded with the cost they saved, and never shared across tenants or credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayHandle, SimHandle, track
from tests.gateway.test_control import Keyed
from tokenbooth.cache.entry import Entry, split_events
from tokenbooth.gateway.caching import ResponseCache
from tokenbooth.pricing import plain
from tokenbooth.record import TokenUsage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0,
        "max_tokens": 12}
CACHE = {"enabled": True}


@pytest.fixture
def cached(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> GatewayHandle:
    return make_gateway([{"name": "sim", "base_url": sim.url}], cache=CACHE)


def _calls(sim: SimHandle) -> int:
    return int(sim.stats()["total"])


def _post(gw: GatewayHandle, body: dict[str, Any] = CHAT, path: str = "chat/completions",
          **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/{path}", json=body, headers=headers, timeout=10)


def _stream(gw: GatewayHandle, body: dict[str, Any], path: str = "chat/completions") -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{gw.url}/{path}", json={**body, "stream": True}, timeout=10) as resp:
        return resp, resp.read()


def test_two_identical_chat_calls_reach_the_upstream_once_and_the_hit_is_recorded_with_its_saved_cost(
        cached: GatewayHandle, sim: SimHandle) -> None:
    first, second = _post(cached), _post(cached)
    assert _calls(sim) == 1
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.content == first.content
    assert (first.headers["x-tokenbooth-cache"], second.headers["x-tokenbooth-cache"]) == ("miss", "hit")
    assert "age" not in first.headers and int(second.headers["age"]) >= 0
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    miss, hit = cached.rows()
    assert (miss.cache, miss.saved_cost_usd, miss.cost_usd > 0) == ("miss", None, True)
    assert (hit.cache, hit.outcome, hit.http_status, hit.attempts) == ("hit", "success", 200, 0)
    assert hit.cost_usd == 0 and hit.input_tokens == hit.output_tokens == 0  # the hit used nothing
    assert hit.saved_cost_usd == miss.cost_usd  # exact: the same price of the same usage
    assert cached.sample("tokenbooth_cache_saved_usd_total") == pytest.approx(float(miss.cost_usd), abs=1e-12)
    assert cached.sample("tokenbooth_cache_saved_tokens_total", type="output") == miss.output_tokens
    assert cached.sample("tokenbooth_cache_requests_total", result="hit") == 1
    assert cached.sample("tokenbooth_cache_requests_total", result="miss") == 1
    assert cached.sample("tokenbooth_requests_total", outcome="success") == 2
    assert cached.sample("tokenbooth_cost_usd_total") == pytest.approx(float(miss.cost_usd), abs=1e-12)
    assert cached.sample("tokenbooth_cache_entries") == 1 and cached.sample("tokenbooth_cache_bytes") > 0


def test_the_official_client_gets_a_hit_in_its_own_form(cached: GatewayHandle, sim: SimHandle) -> None:
    client = track(openai.OpenAI(base_url=cached.url, api_key="sk-client", max_retries=0))
    a = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    b = client.chat.completions.with_raw_response.create(**CHAT)
    assert b.headers["x-tokenbooth-cache"] == "hit"
    assert b.parse().choices[0].message.content == a.choices[0].message.content
    assert _calls(sim) == 1


def test_a_streamed_hit_is_a_real_stream_with_the_same_events_and_usage(cached: GatewayHandle, sim: SimHandle) -> None:
    first, raw1 = _stream(cached, CHAT)
    second, raw2 = _stream(cached, CHAT)
    assert _calls(sim) == 1
    assert (first.headers["x-tokenbooth-cache"], second.headers["x-tokenbooth-cache"]) == ("miss", "hit")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert raw2 == raw1 and raw1.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in raw2  # the client did not ask for usage: the gateway's own request for it stays hidden
    # a client that asks for usage gets the usage the upstream reported, from the same entry
    _, raw3 = _stream(cached, {**CHAT, "stream_options": {"include_usage": True}})
    assert _calls(sim) == 1
    usage = [orjson.loads(line[6:])["usage"] for line in raw3.split(b"\n")
             if line.startswith(b"data: {") and b'"usage":{' in line]
    miss, hit, hit_with_usage = cached.rows()
    assert usage == [{"prompt_tokens": miss.input_tokens, "completion_tokens": miss.output_tokens,
                      "total_tokens": miss.input_tokens + miss.output_tokens,
                      "prompt_tokens_details": {"cached_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0}}]
    assert (hit.cache, hit.streamed, hit.cost_usd, hit.saved_cost_usd) == ("hit", True, 0, miss.cost_usd)
    assert hit_with_usage.saved_cost_usd == miss.cost_usd
    # a plain call is not answered from a stream: the form is part of the key
    assert _post(cached).headers["x-tokenbooth-cache"] == "miss" and _calls(sim) == 2


def test_a_hit_is_replayed_event_by_event() -> None:
    events = b"".join(b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i for i in range(5)) + \
        b"data: [DONE]\n\n"
    entry = Entry(events, "text/event-stream", TokenUsage(1, 5), None, 0.0, split_events(events))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ResponseCache.replay(entry, send, [], strip_usage=False))
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies[:-1] == entry.chunks() and len(bodies) == 7 and bodies[-1] == b""


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_api_call_is_cached_with_its_usage(cached: GatewayHandle, sim: SimHandle, stream: bool) -> None:
    usage = {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 500,
             "output_tokens_details": {"reasoning_tokens": 200}, "total_tokens": 3500}
    sim.script([{"usage": usage}])
    body = {"model": "gpt-4o", "input": "Tell me a story", "temperature": 0}
    if stream:
        (first, raw1), (second, raw2) = _stream(cached, body, "responses"), _stream(cached, body, "responses")
        assert raw2 == raw1 and b"event: response.completed" in raw2 and b'"reasoning_tokens":200' in raw2
    else:
        first, second = _post(cached, body, "responses"), _post(cached, body, "responses")
        assert second.json() == first.json() and second.json()["usage"] == usage
    assert second.headers["x-tokenbooth-cache"] == "hit" and _calls(sim) == 1
    miss, hit = cached.rows()
    assert (miss.input_tokens, miss.cached_input_tokens, miss.reasoning_tokens) == (3000, 1024, 200)
    assert hit.saved_cost_usd == miss.cost_usd > 0 and hit.cost_usd == 0
    assert cached.sample("tokenbooth_cache_saved_tokens_total", type="cached_input") == 1024
    assert cached.sample("tokenbooth_cache_saved_tokens_total", type="reasoning") == 200


def test_anthropic_messages_and_embeddings_are_cached(cached: GatewayHandle, sim: SimHandle) -> None:
    claude = {"model": "claude-haiku-4-5", "max_tokens": 8, "temperature": 0,
              "messages": [{"role": "user", "content": "hi"}]}
    headers = {"anthropic-version": "2023-06-01"}
    for _ in range(2):
        answer = httpx.post(f"{cached.base}/v1/messages", json=claude, headers=headers, timeout=10)
    assert answer.headers["x-tokenbooth-cache"] == "hit"
    with httpx.stream("POST", f"{cached.base}/v1/messages", json={**claude, "stream": True}, headers=headers) as r:
        raw1 = r.read()
    with httpx.stream("POST", f"{cached.base}/v1/messages", json={**claude, "stream": True}, headers=headers) as r:
        raw2 = r.read()
        assert r.headers["x-tokenbooth-cache"] == "hit"
    assert raw2 == raw1 and b"event: message_stop" in raw2
    embed = {"model": "text-embedding-3-small", "input": ["a", "b"]}  # no temperature: always the same answer
    assert [_post(cached, embed, "embeddings").headers["x-tokenbooth-cache"] for _ in range(2)] == ["miss", "hit"]
    assert _calls(sim) == 3
    rows = cached.rows()
    assert [r.cache for r in rows] == ["miss", "hit", "miss", "hit", "miss", "hit"]
    assert all(hit.saved_cost_usd == miss.cost_usd for miss, hit in zip(rows[::2], rows[1::2], strict=True))


def test_a_changed_field_or_an_unpinned_sample_misses_and_a_reformatted_request_hits(
        cached: GatewayHandle, sim: SimHandle) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert _post(cached, {**CHAT, "tools": tools}).headers["x-tokenbooth-cache"] == "miss"
    other = [{"type": "function", "function": {"name": "sub", "parameters": {"type": "object"}}}]
    assert _post(cached, {**CHAT, "tools": other}).headers["x-tokenbooth-cache"] == "miss"
    # the same request written another way: other field order, 0.0 for 0, a user and metadata
    raw = b'{"tools":' + orjson.dumps(tools) + b',"max_tokens":12.0,"temperature":0.0,"user":"u1",' \
        b'"metadata":{"a":"b"},"messages":[{"content":"What is 2+2?","role":"user"}],"model":"gpt-4o-mini"}'
    again = httpx.post(f"{cached.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert again.headers["x-tokenbooth-cache"] == "hit" and _calls(sim) == 2
    # a sample (temperature unset: the API's default of 1) is neither looked up nor stored; a seed pins it
    sample = {k: v for k, v in CHAT.items() if k != "temperature"}
    assert [_post(cached, sample).headers["x-tokenbooth-cache"] for _ in range(2)] == ["bypass", "bypass"]
    assert _post(cached, {**sample, "n": 2, "temperature": 0}).headers["x-tokenbooth-cache"] == "bypass"
    seeded = {**sample, "temperature": 0.7, "seed": 7}
    assert [_post(cached, seeded).headers["x-tokenbooth-cache"] for _ in range(2)] == ["miss", "hit"]
    assert _calls(sim) == 2 + 2 + 1 + 1


def test_cache_control_and_the_ttl_header_decide_lookup_and_store(cached: GatewayHandle, sim: SimHandle) -> None:
    now = [1_000_000.0]
    cache = cached.gateway.proxy.cache
    assert cache is not None
    cache.clock = cache.backend.clock = lambda: now[0]  # type: ignore[attr-defined]
    assert _post(cached, **{"cache-control": "no-store"}).headers["x-tokenbooth-cache"] == "store-skipped"
    assert _post(cached).headers["x-tokenbooth-cache"] == "miss"  # nothing was stored
    assert _post(cached, **{"cache-control": "no-cache"}).headers["x-tokenbooth-cache"] == "bypass"
    assert _calls(sim) == 3
    now[0] += 30
    aged = _post(cached)
    assert (aged.headers["x-tokenbooth-cache"], aged.headers["age"]) == ("hit", "30")
    assert _post(cached, **{"cache-control": "max-age=10"}).headers["x-tokenbooth-cache"] == "miss"  # too old
    assert _calls(sim) == 4
    short = {**CHAT, "max_tokens": 5}
    assert _post(cached, short, **{"x-tokenbooth-cache-ttl": "60"}).headers["x-tokenbooth-cache"] == "miss"
    now[0] += 59
    assert _post(cached, short).headers["x-tokenbooth-cache"] == "hit"
    now[0] += 2
    assert _post(cached, short).headers["x-tokenbooth-cache"] == "miss"  # its 60 s are over
    assert _post(cached, **{"x-tokenbooth-cache-ttl": "soon"}).status_code == 400
    assert cached.sample("tokenbooth_cache_requests_total", result="bypass") == 1
    assert cached.sample("tokenbooth_cache_requests_total", result="store_skipped") == 1


def test_errors_and_cut_off_streams_are_never_stored(cached: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"status": 400}])
    assert _post(cached).status_code == 400
    assert _post(cached).headers["x-tokenbooth-cache"] == "miss"  # the error was not kept
    sim.script([{"fault": "truncate"}])
    _, cut = _stream(cached, CHAT)
    assert b"[DONE]" not in cut
    _, whole = _stream(cached, CHAT)
    assert b"[DONE]" in whole
    assert _calls(sim) == 4
    assert [r.cache for r in cached.rows()] == ["miss", "miss", "miss", "miss"]
    _, again = _stream(cached, CHAT)
    assert again == whole and _calls(sim) == 4


def test_an_answer_larger_than_max_entry_bytes_is_not_stored(make_gateway: Callable[..., GatewayHandle],
                                                              sim: SimHandle) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url}], cache={"enabled": True, "max_entry_bytes": 1024})
    small = {**CHAT, "max_tokens": 2}
    big = {**CHAT, "max_tokens": 60}  # its stream passes 1 KB
    assert [_post(gw, small).headers["x-tokenbooth-cache"] for _ in range(2)] == ["miss", "hit"]
    for _ in range(2):
        resp, raw = _stream(gw, big)
        assert resp.headers["x-tokenbooth-cache"] == "miss" and len(raw) > 1024 and raw.endswith(b"[DONE]\n\n")
    assert _calls(sim) == 3


def test_tenants_never_share_entries_hits_are_not_charged_and_a_tenant_may_turn_it_off(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    # every flat-model call costs 0.05 USD: acme may make 2 calls a month
    k = Keyed(make_gateway, sim, tmp_path, tenants={"acme": {"budgets": ["0.10/month"]}},
              cache={"enabled": True, "tenants": {"beta": False}})
    acme, other, beta = k.key("acme"), k.key("globex"), k.key("beta")
    gw = k.start()
    body = {"model": "flat-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "temperature": 0}
    assert [k.post(acme, body).headers["x-tokenbooth-cache"] for _ in range(6)] == ["miss"] + ["hit"] * 5
    assert k.post(other, body).headers["x-tokenbooth-cache"] == "miss"  # another tenant: its own upstream call
    assert _calls(sim) == 2
    assert k.post(acme, {**body, "max_tokens": 9}).status_code == 200  # the hits were free: room for one more
    assert k.post(acme, {**body, "max_tokens": 10}).status_code == 429
    assert k.post(acme, body).headers["x-tokenbooth-cache"] == "hit"  # a hit costs nothing, so it is served
    assert [k.post(beta, body).headers["x-tokenbooth-cache"] for _ in range(2)] == ["bypass", "bypass"]
    assert _calls(sim) == 5
    rows = gw.rows()
    assert sum((r.cost_usd for r in rows if r.tenant == "acme"), Decimal(0)) == Decimal("0.10")
    assert sum((r.saved_cost_usd or 0 for r in rows if r.tenant == "acme"), Decimal(0)) == Decimal("0.30")
    assert gw.sample_when("tokenbooth_budget_spent_usd", 0.10, tenant="acme", window="month") == pytest.approx(0.10)


def test_in_open_mode_clients_with_their_own_upstream_keys_never_share_entries(cached: GatewayHandle,
                                                                                sim: SimHandle) -> None:
    answers = [_post(cached, authorization=f"Bearer sk-{who}").headers["x-tokenbooth-cache"]
               for who in ("alice", "bob", "alice")]
    assert answers == ["miss", "miss", "hit"] and _calls(sim) == 2




def test_a_redis_backend_without_redis_url_fails_at_start_naming_the_keys() -> None:
    from prometheus_client import CollectorRegistry

    from tokenbooth.catalog import Metrics
    from tokenbooth.config import load_settings
    from tokenbooth.errors import ConfigError
    from tokenbooth.gateway.caching import build_cache

    settings = load_settings(overrides={"cache": {"enabled": True, "backend": "redis"}}, environ={})
    with pytest.raises(ConfigError, match=r"cache.backend is 'redis' but redis.url is not set"):
        build_cache(settings, Metrics(CollectorRegistry()))


def test_the_report_shows_cache_hits_and_the_cost_they_saved(cached: GatewayHandle) -> None:
    from tokenbooth.ledger.report import render, report
    from tokenbooth.ledger.schema import connect

    for _ in range(3):
        assert _post(cached).status_code == 200
    miss = cached.rows()[0]
    engine = connect(cached.settings.ledger.url, create=False)
    try:
        (row,) = report(engine, "model")
    finally:
        engine.dispose()
    assert (row.requests, row.cache_hits, row.saved_usd, row.cost_usd) == (3, 2, 2 * miss.cost_usd, miss.cost_usd)
    assert orjson.loads(render([row], "json", "model"))[0]["saved_usd"] == plain(2 * miss.cost_usd)
    table = render([row], "table", "model")
    assert "cache hits" in table and "saved USD" in table and f"{2 * miss.cost_usd:,.6f}" in table
