"""Streams through the gateway: pass-through timing, usage capture, hang-ups, broken upstreams."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayHandle, SimHandle, track


def _events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for line in raw.splitlines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


@pytest.fixture
def slow_gw(make_sim: Callable[..., SimHandle], make_gateway: Callable[..., GatewayHandle]
            ) -> tuple[GatewayHandle, SimHandle]:
    sim = make_sim(ttft_ms=300, token_ms=20)
    return make_gateway([{"name": "sim", "base_url": sim.url, "models": ["*"]}]), sim


def test_first_chunk_reaches_the_client_as_the_upstream_sends_it(slow_gw: tuple[GatewayHandle, SimHandle]) -> None:
    gw, sim = slow_gw
    client = track(openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0))
    lags = []
    for attempt in range(3):  # best of three: a busy shared machine can stall any one read
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=12)
        first_content_at = None
        for chunk in stream:
            if first_content_at is None and chunk.choices and chunk.choices[0].delta.content:
                first_content_at = time.perf_counter()
        assert first_content_at is not None
        lags.append(first_content_at - sim.sim.first_content_sent[attempt])  # same process, same clock
    lag = min(lags)
    assert 0 <= lag < 0.05, f"first chunk reached the client {lag * 1000:.1f} ms after the upstream sent it"
    rows = gw.rows()
    assert min(r.ttft_s for r in rows) > 0.29 and sorted(r.ttft_s for r in rows)[1] < 0.4
    assert all(r.duration_s >= r.ttft_s + 11 * 0.02 * 0.9 for r in rows)  # the histogram covers the stream
    assert gw.sample("tokenbooth_time_to_first_token_seconds_count") == 3
    assert gw.sample("tokenbooth_time_per_output_token_seconds_count") == 3
    tpot = gw.sample("tokenbooth_time_per_output_token_seconds_sum") / 3
    assert 0.015 < tpot < 0.05  # 20 ms between chunks


USAGE = {"prompt_tokens": 1234, "completion_tokens": 8, "total_tokens": 1242,
         "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 0}}


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_usage_is_captured_without_the_client_seeing_it(gateway: GatewayHandle, sim: SimHandle, path: str) -> None:
    sim.script([{"usage": USAGE}])
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True}
    body.update({"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat") else {"prompt": "x"})
    with httpx.stream("POST", f"{gateway.url}/{path}", json=body) as resp:
        raw = resp.read()
    events = _events(raw)
    assert events and all("usage" not in e for e in events), raw[-400:]
    assert raw.rstrip().endswith(b"data: [DONE]")
    row = gateway.rows()[0]
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens) == (1234, 8, 1024)
    assert not row.tokens_estimated
    assert gateway.sample("tokenbooth_tokens_total", type="cached_input") == 1024


def test_usage_passes_through_when_the_client_asked_for_it(gateway: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"usage": USAGE}])
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1234
    assert gateway.rows()[0].input_tokens == 1234


def test_a_client_that_hangs_up_is_cancelled_with_estimated_tokens(slow_gw: tuple[GatewayHandle, SimHandle]) -> None:
    gw, sim = slow_gw
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a long story"}],
            "stream": True, "max_tokens": 200}
    with httpx.Client() as client, client.stream("POST", f"{gw.url}/chat/completions", json=body) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 2:
                    break
    hung_up = time.perf_counter()
    while sim.stats()["open_streams"] and time.perf_counter() - hung_up < 2:
        time.sleep(0.02)
    closed_after = time.perf_counter() - hung_up
    assert sim.stats()["open_streams"] == 0 and closed_after < 1.0, f"upstream still open after {closed_after:.2f}s"
    gw.sample_seen("tokenbooth_requests_total", outcome="cancelled")
    row = gw.rows()[0]
    assert (row.outcome, row.error_type) == ("cancelled", "cancelled")
    assert row.tokens_estimated and row.output_tokens >= 2 and row.input_tokens > 0
    assert row.cost_usd is not None and row.cost_usd > 0  # what was billed is counted
    assert gw.sample("tokenbooth_requests_total", outcome="cancelled", error_type="cancelled") == 1


@pytest.mark.parametrize(("fault", "error_type"), [("break", "connection"), ("truncate", "invalid_response")])
def test_a_broken_upstream_stream_ends_the_clients_stream_with_an_error(
    gateway: GatewayHandle, sim: SimHandle, fault: str, error_type: str
) -> None:
    sim.script([{"fault": fault, "usage": {"completion_tokens": 20}}])
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", f"{gateway.url}/chat/completions", json=body, timeout=10) as resp:
        raw = resp.read()
    events = _events(raw)
    assert "error" in events[-1], raw[-300:]
    row = gateway.rows()[0]
    assert (row.outcome, row.error_type) == ("error", error_type)
    assert row.tokens_estimated and row.output_tokens > 0
    gw_client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    assert gw_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ok"}])


def test_missing_usage_is_estimated_and_marked(gateway: GatewayHandle, sim: SimHandle) -> None:
    sim.script([{"usage": {}}])  # an upstream that reports nothing
    text = "The quick brown fox jumps over the lazy dog."
    r = httpx.post(f"{gateway.url}/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200
    row = gateway.rows()[0]
    assert row.tokens_estimated
    assert row.input_tokens == 10 + 3 + 3  # o200k tokens of the text, plus chat framing
    assert row.output_tokens > 0 and row.cost_usd > 0


def test_a_reported_usage_far_from_the_estimate_is_flagged(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "models": ["*"]}], tokens={"reconcile_sample": 1})
    sim.script([{}, {"usage": {"prompt_tokens": 5000, "completion_tokens": 16}}])
    for _ in range(2):
        httpx.post(f"{gw.url}/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
                         "max_tokens": 16}).raise_for_status()
    honest, inflated = gw.rows()
    assert not honest.tokens_mismatch and inflated.tokens_mismatch
    assert inflated.input_tokens == 5000  # reported usage still wins
    assert gw.sample("tokenbooth_token_estimate_mismatch_total") == 1


def test_a_client_that_hangs_up_after_the_last_event_has_a_complete_call(
        make_gateway: Callable[..., GatewayHandle]) -> None:
    """openai's client closes its connection at [DONE]; if the upstream's end of the HTTP body
    comes a moment later, the call is still complete, with the usage the upstream reported."""
    import socket
    import threading

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}},
    ]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    listener = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(body), body))
            time.sleep(0.5)  # the end of the HTTP body comes late
            conn.sendall(b"0\r\n\r\n")
            time.sleep(0.2)

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    gw = make_gateway([{"name": "raw", "base_url": f"http://127.0.0.1:{listener.getsockname()[1]}/v1"}])
    client = track(openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0))
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    thread.join(5)
    listener.close()
    row = gw.rows()[0]
    assert (row.outcome, row.input_tokens, row.output_tokens, row.tokens_estimated) == ("success", 7, 1, False)
