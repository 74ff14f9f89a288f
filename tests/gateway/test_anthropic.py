"""Anthropic's Messages API through the gateway, driven by the official anthropic client."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import anthropic
import httpx
import pytest

from tests.conftest import GatewayHandle, SimHandle, track

MODEL = "claude-haiku-4-5"
# Uncached input, cache reads and cache writes are reported apart by Anthropic.
USAGE = {"input_tokens": 100, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 500,
         "output_tokens": 300}
# Claude Haiku 4.5 per 1M tokens: $1 input, $0.10 cache read, $1.25 cache write (5 min), $5 output.
HAND_COST = (Decimal(100) * 1 + Decimal(2000) * Decimal("0.1") + Decimal(500) * Decimal("1.25")
             + Decimal(300) * 5) / 10**6  # = 0.002425



@pytest.fixture
def gw(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> GatewayHandle:
    return make_gateway([{"name": "anthropic", "base_url": sim.url, "provider": "anthropic",
                          "models": ["claude-*"]}])


def _client(gw: GatewayHandle) -> anthropic.Anthropic:
    return track(anthropic.Anthropic(base_url=gw.base, api_key="sk-ant-client", max_retries=0))


def test_messages_with_cache_tokens_are_metered_and_priced_exactly(gw: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"usage": USAGE}])
    message = _client(gw).messages.create(model=MODEL, max_tokens=300,
                                          messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].type == "text" and message.usage.cache_read_input_tokens == 2000
    row = gw.rows()[0]
    assert (row.provider, row.operation, row.streamed) == ("anthropic", "chat", False)
    assert (row.input_tokens, row.cached_input_tokens, row.cache_write_tokens, row.output_tokens) == \
        (2600, 2000, 500, 300)
    assert abs(row.cost_usd - HAND_COST) < Decimal("1e-9")
    assert row.cost_usd == HAND_COST
    assert gw.sample("tokenbooth_cost_usd_total") == pytest.approx(float(HAND_COST), abs=1e-12)
    assert gw.sample("tokenbooth_tokens_total", type="cache_write") == 500
    assert gw.sample("tokenbooth_tokens_total", type="cached_input") == 2000


def test_streamed_messages_are_metered_with_cache_tokens(gw: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"usage": USAGE}])
    with _client(gw).messages.stream(model=MODEL, max_tokens=300,
                                     messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens == 300
    row = gw.rows()[0]
    assert row.streamed and row.outcome == "success" and not row.tokens_estimated
    assert (row.input_tokens, row.cached_input_tokens, row.cache_write_tokens, row.output_tokens) == \
        (2600, 2000, 500, 300)
    assert row.cost_usd == HAND_COST
    assert row.ttft_s is not None and row.ttft_s <= row.duration_s


def test_the_clients_credentials_and_version_pass_through(gw: GatewayHandle, sim: SimHandle) -> None:
    seen = sim.spy_headers()
    _client(gw).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    # anthropic SDKs send the key as x-api-key (older) or a bearer token (newer): either passes
    assert "sk-ant-client" in (seen[0].get("x-api-key", "") + seen[0].get("authorization", ""))
    assert seen[0]["anthropic-version"]


def test_a_configured_key_goes_upstream_as_x_api_key(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANT_KEY", "sk-ant-upstream")
    gw = make_gateway([{"name": "a", "base_url": sim.url, "provider": "anthropic", "api_key_env": "ANT_KEY"}])
    seen = sim.spy_headers()
    _client(gw).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert seen[0]["x-api-key"] == "sk-ant-upstream" and "authorization" not in seen[0]


def test_errors_on_the_messages_route_use_anthropics_format(gw: GatewayHandle, sim: SimHandle) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        _client(gw).messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    r = httpx.post(f"{gw.url}/messages", content=b"{oops")
    assert r.status_code == 400 and r.json()["type"] == "error"
    sim.script([{"status": 529}])
    with pytest.raises(anthropic.APIStatusError) as status_info:
        _client(gw).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert status_info.value.status_code == 529
    assert gw.sample("tokenbooth_requests_total", error_type="server_error") == 1


def test_a_hung_up_anthropic_stream_keeps_the_reported_input_and_estimates_output(
    make_sim: Callable[..., SimHandle], make_gateway: Callable[..., GatewayHandle]
) -> None:
    sim = make_sim(token_ms=20)
    gw = make_gateway([{"name": "a", "base_url": sim.url, "provider": "anthropic", "models": ["*"]}])
    sim.script([{"usage": {**USAGE, "output_tokens": 100}}])
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client() as client, client.stream("POST", f"{gw.url}/messages", json=body) as resp:
        deltas = 0
        for line in resp.iter_lines():
            if "text_delta" in line:
                deltas += 1
                if deltas == 3:
                    break
    gw.sample_seen("tokenbooth_requests_total", outcome="cancelled")
    row = gw.rows()[0]
    assert row.outcome == "cancelled" and row.tokens_estimated
    assert (row.input_tokens, row.cached_input_tokens) == (2600, 2000)  # reported at message_start
    assert 3 <= row.output_tokens < 100
