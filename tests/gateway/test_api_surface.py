"""The rest of the API surface the official clients use: model lookup, token counting, tolerant input."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import GatewayHandle, SimHandle, track


def test_models_retrieve_answers_from_the_same_list(gateway: GatewayHandle) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    listed = {m.id for m in client.models.list().data}
    model = client.models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini" and model.id in listed
    missing = httpx.get(f"{gateway.url}/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_stream_null_is_not_streaming(gateway: GatewayHandle) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": None, "n": None}
    r = httpx.post(f"{gateway.url}/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"]
    assert gateway.rows()[0].streamed is False
    bad = httpx.post(f"{gateway.url}/chat/completions", json={**body, "stream": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


def test_count_tokens_passes_through_with_its_query_and_is_recorded_at_no_cost(
        gateway: GatewayHandle, sim: SimHandle) -> None:
    claude = track(anthropic.Anthropic(base_url=gateway.base, api_key="sk-ant", max_retries=0))
    counted = claude.messages.count_tokens(model="claude-haiku-4-5", messages=[{"role": "user", "content": "hello"}],
                                           extra_query={"beta": "true"})
    assert counted.input_tokens > 0
    assert sim.sim.queries[-1] == "beta=true"
    row = gateway.rows()[0]
    assert (row.operation, row.outcome, row.error_type, row.provider) == ("count_tokens", "success", "", "anthropic")
    assert (row.input_tokens, row.output_tokens, row.cost_usd, row.tokens_estimated) == (0, 0, 0, False)
    assert gateway.sample("tokenbooth_requests_total", operation="count_tokens", outcome="success") == 1
    assert gateway.sample("tokenbooth_tokens_total") == 0 and gateway.sample("tokenbooth_unpriced_requests_total") == 0


def test_messages_in_the_one_line_form_are_anthropic_calls_with_anthropic_errors(
        gateway: GatewayHandle, sim: SimHandle) -> None:
    claude = track(anthropic.Anthropic(base_url=gateway.base, api_key="sk-ant", max_retries=0))
    claude.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert gateway.rows()[0].provider == "anthropic"
    assert gateway.sample("tokenbooth_requests_total", provider="anthropic") == 1
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(f"{gateway.base}{path}", content=b"{oops")
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_gives_up_on_a_slow_call_closes_the_upstream_call_and_is_cancelled(
        gateway: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"fault": "timeout", "seconds": 5}])  # the upstream answers after 5 s
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0, timeout=1))
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    gateway.sample_seen("tokenbooth_requests_total", outcome="cancelled")
    assert time.monotonic() - t0 < 3  # recorded well before the upstream would have answered
    row = gateway.rows()[0]
    assert (row.outcome, row.error_type, row.http_status) == ("cancelled", "cancelled", None)
    assert 0.9 < row.duration_s < 2
    assert row.tokens_estimated and row.input_tokens > 0 and row.output_tokens == 0
    assert gateway.sample("tokenbooth_in_flight_requests") == 0
    deadline = time.monotonic() + 3
    while sim.stats()["client_disconnects"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.stats()["client_disconnects"] == 1  # the upstream saw its connection closed
