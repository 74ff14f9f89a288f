"""The OpenAI Responses API through the gateway, with the official openai client."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price

from tests.conftest import GatewayHandle, SimHandle, track

USAGE = {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 500,
         "output_tokens_details": {"reasoning_tokens": 200}, "total_tokens": 3500}
EXPECTED = calc_price(Usage(input_tokens=3000, cache_read_tokens=1024, output_tokens=500), "gpt-4o",
                      provider_id="openai").total_price


@pytest.mark.parametrize("stream", [False, True])
def test_responses_are_metered_with_cached_and_reasoning_tokens_exactly(
        gateway: GatewayHandle, sim: SimHandle, stream: bool) -> None:
    sim.script([{"usage": USAGE}])
    seen = sim.spy_headers()
    client = track(openai.OpenAI(base_url=gateway.url, api_key="sk-client", max_retries=0))
    if stream:
        events = list(client.responses.create(model="gpt-4o", input="Tell me a story", stream=True))
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    else:
        response = client.responses.create(model="gpt-4o", input=[{"role": "user", "content": "Tell me a story"}])
        text = response.output_text
        assert response.usage is not None and response.usage.input_tokens == 3000
    assert text and seen
    row = gateway.rows()[0]
    assert (row.operation, row.outcome, row.streamed, row.tokens_estimated) == ("chat", "success", stream, False)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens) == \
        (3000, 1024, 500, 200)
    assert abs(row.cost_usd - EXPECTED) < Decimal("1e-9")
    assert gateway.sample("tokenbooth_cost_usd_total") == pytest.approx(float(EXPECTED), abs=1e-9)
    assert gateway.sample("tokenbooth_tokens_total", type="reasoning") == 200


def test_a_streamed_response_is_never_sent_stream_options(gateway: GatewayHandle, sim: SimHandle) -> None:
    bodies: list[bytes] = []
    original = sim.sim._generate

    async def spy(request: object, api: str) -> object:
        bodies.append(await request.read())  # type: ignore[attr-defined]
        return await original(request, api)  # type: ignore[arg-type]

    sim.sim._generate = spy  # type: ignore[method-assign]
    with httpx.stream("POST", f"{gateway.url}/responses", json={"model": "gpt-4o-mini", "input": "hi",
                                                                "stream": True}) as resp:
        raw = b"".join(resp.iter_bytes())
    assert b"event: response.completed" in raw and b"[DONE]" not in raw
    assert b"stream_options" not in bodies[0]
    assert gateway.rows()[0].input_tokens > 0


def test_a_response_stream_the_client_closes_is_cancelled_and_estimated(
        make_sim: Callable[..., SimHandle], make_gateway: Callable[..., GatewayHandle]) -> None:
    sim = make_sim(ttft_ms=100, token_ms=30)
    gw = make_gateway([{"name": "sim", "base_url": sim.url}])
    body = {"model": "gpt-4o-mini", "input": "tell me a long story", "stream": True, "max_output_tokens": 200}
    with httpx.stream("POST", f"{gw.url}/responses", json=body) as resp:
        deltas = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and "output_text.delta" in line:
                deltas += 1
                if deltas == 3:
                    break
    gw.sample_seen("tokenbooth_requests_total", outcome="cancelled")
    row = gw.rows()[0]
    assert (row.outcome, row.error_type, row.tokens_estimated) == ("cancelled", "cancelled", True)
    assert row.output_tokens >= 3 and row.input_tokens > 0 and row.cost_usd > 0
