"""The official clients, instrumented in-process, against the real simulated upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import sqlalchemy as sa
from genai_prices import Usage, calc_price
from prometheus_client import CollectorRegistry

import tokenbooth
from tests.conftest import SimHandle, track
from tokenbooth.catalog import total
from tokenbooth.errors import UsageError
from tokenbooth.ledger.schema import calls

USAGE = {"prompt_tokens": 1500, "completion_tokens": 40, "total_tokens": 1540,
         "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _openai(sim: SimHandle, registry: CollectorRegistry, **kw: Any) -> openai.OpenAI:
    client = track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0))
    return tokenbooth.instrument(client, registry=registry, **kw)


def test_sync_calls_are_counted_with_exact_tokens_and_cost(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = _openai(sim, registry)
    sim.script([{"usage": USAGE}])
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    completion = client.completions.create(model="gpt-4o-mini", prompt="once", max_tokens=5)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert chat.usage is not None and chat.usage.prompt_tokens == 1500
    assert total(registry, "tokenbooth_requests_total", outcome="success") == 3
    assert total(registry, "tokenbooth_requests_total", operation="embeddings") == 1
    assert completion.usage is not None
    assert total(registry, "tokenbooth_tokens_total", type="input") == \
        1500 + completion.usage.prompt_tokens + embedding.usage.prompt_tokens
    assert total(registry, "tokenbooth_tokens_total", type="cached_input") == 1024
    expected = (calc_price(Usage(input_tokens=1500, output_tokens=40, cache_read_tokens=1024), "gpt-4o-mini",
                           provider_id="openai").total_price
                + calc_price(Usage(input_tokens=completion.usage.prompt_tokens,
                                   output_tokens=completion.usage.completion_tokens), "gpt-4o-mini",
                             provider_id="openai").total_price
                + calc_price(Usage(input_tokens=embedding.usage.prompt_tokens), "text-embedding-3-small",
                             provider_id="openai").total_price)
    assert total(registry, "tokenbooth_cost_usd_total") == pytest.approx(float(expected), abs=1e-12)
    assert total(registry, "tokenbooth_in_flight_requests") == 0


def test_async_client(sim: SimHandle) -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        client = tokenbooth.instrument(openai.AsyncOpenAI(base_url=sim.url, api_key="k", max_retries=0),
                                       registry=registry)
        try:
            await asyncio.gather(*(client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]) for _ in range(5)))
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            async for _ in stream:
                pass
        finally:
            await client.close()

    asyncio.run(main())
    assert total(registry, "tokenbooth_requests_total", model="gpt-4o", outcome="success") == 6
    assert total(registry, "tokenbooth_time_to_first_token_seconds_count") == 1


def test_streaming_records_ttft_and_the_reported_usage(make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(ttft_ms=200, token_ms=10)
    registry = CollectorRegistry()
    client = _openai(sim, registry)
    sim.script([{"usage": {**USAGE, "completion_tokens": 12}}])
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    first = None
    usage = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 12
    assert total(registry, "tokenbooth_requests_total", outcome="success") == 1
    assert total(registry, "tokenbooth_tokens_total", type="output") == 12
    assert total(registry, "tokenbooth_tokens_total", type="input") == 1500
    ttft_sum = total(registry, "tokenbooth_time_to_first_token_seconds_sum")
    assert first is not None and 0.19 < ttft_sum <= first + 0.01


def test_an_abandoned_stream_is_recorded_as_cancelled_with_estimated_tokens(
    make_sim: Callable[..., SimHandle], tmp_path: Path
) -> None:
    sim = make_sim(token_ms=20)
    registry = CollectorRegistry()
    db = f"sqlite:///{tmp_path / 'l.db'}"
    client = _openai(sim, registry, ledger=db)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "story"}],
                                            stream=True, max_tokens=100)
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 2:
                break
    stream.close()
    assert total(registry, "tokenbooth_requests_total", outcome="cancelled", error_type="cancelled") == 1
    assert total(registry, "tokenbooth_in_flight_requests") == 0
    from tokenbooth.sdk.runtime import get_runtime

    ledger = get_runtime(registry, db).ledger
    assert ledger is not None and ledger.flush(10)
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        row = conn.execute(sa.select(calls)).one()
    engine.dispose()
    assert row.outcome == "cancelled" and row.tokens_estimated and row.output_tokens >= 2


def test_errors_keep_the_clients_own_types_and_are_classified(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = _openai(sim, registry)
    sim.script([{"status": 429}, {"status": 500}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    dead = track(openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="k", max_retries=0))
    tokenbooth.instrument(dead, registry=registry)
    with pytest.raises(openai.APIConnectionError):
        dead.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert total(registry, "tokenbooth_requests_total", error_type="rate_limited") == 1
    assert total(registry, "tokenbooth_requests_total", error_type="server_error") == 1
    assert total(registry, "tokenbooth_requests_total", error_type="connection") == 1


def test_client_retries_are_each_metered(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=2)),
                                   registry=registry)
    sim.script([{"status": 429, "retry_after": 0}, {}])
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert total(registry, "tokenbooth_requests_total", error_type="rate_limited") == 1
    assert total(registry, "tokenbooth_requests_total", outcome="success") == 1


def test_anthropic_sync_async_and_stream_helper(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    usage = {"input_tokens": 100, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 500,
             "output_tokens": 300}
    client = tokenbooth.instrument(track(anthropic.Anthropic(base_url=sim.base, api_key="k", max_retries=0)),
                                   registry=registry)
    sim.script([{"usage": usage}, {"usage": usage}, {"usage": usage}])
    client.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=[{"role": "user", "content": "x"}])
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=300,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        stream.until_done()

    async def run_async() -> None:
        async_client = tokenbooth.instrument(anthropic.AsyncAnthropic(base_url=sim.base, api_key="k", max_retries=0),
                                             registry=registry)
        await async_client.messages.create(model="claude-haiku-4-5", max_tokens=300,
                                           messages=[{"role": "user", "content": "x"}])
        await async_client.close()

    asyncio.run(run_async())
    assert total(registry, "tokenbooth_requests_total", provider="anthropic", outcome="success") == 3
    assert total(registry, "tokenbooth_tokens_total", type="cache_write") == 1500
    assert total(registry, "tokenbooth_tokens_total", type="input") == 3 * 2600
    one = (Decimal(100) * 1 + Decimal(2000) * Decimal("0.1") + Decimal(500) * Decimal("1.25") + Decimal(300) * 5) \
        / 10**6
    assert total(registry, "tokenbooth_cost_usd_total") == pytest.approx(float(3 * one), abs=1e-12)


def test_a_metering_failure_never_breaks_the_call(sim: SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    client = _openai(sim, registry)
    from tokenbooth.calls import Recorder

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metering is broken")

    monkeypatch.setattr(Recorder, "finish", broken)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content


def test_instrument_rejects_other_objects_and_is_idempotent(sim: SimHandle) -> None:
    with pytest.raises(UsageError, match="instrument\\(\\) takes"):
        tokenbooth.instrument(object())
    registry = CollectorRegistry()
    client = _openai(sim, registry)
    assert tokenbooth.instrument(client, registry=registry) is client
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert total(registry, "tokenbooth_requests_total") == 1


def test_a_response_already_in_memory_is_metered_too() -> None:
    """Transports that hand back a read body (test transports, caches) are metered at once."""
    import sys

    import orjson

    probe = track(openai.OpenAI(base_url="http://upstream.test/v1", api_key="k", max_retries=0))
    lib = sys.modules[type(probe._client._transport).__module__.split(".")[0]]  # httpx or httpx2
    body = orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
    transport = lib.MockTransport(lambda request: lib.Response(200, content=body,
                                                               headers={"content-type": "application/json"}))
    client = track(openai.OpenAI(base_url="http://upstream.test/v1", api_key="k", max_retries=0,
                                 http_client=type(probe._client)(transport=transport)))
    registry = CollectorRegistry()
    tokenbooth.instrument(client, registry=registry)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert total(registry, "tokenbooth_tokens_total", type="input") == 7
    assert total(registry, "tokenbooth_requests_total", outcome="success") == 1
