"""The gateway against the real simulated upstream, driven by the official openai client."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price
from prometheus_client import CollectorRegistry

from tests.conftest import GatewayHandle, SimHandle, track

NO_RETRY = {"attempts": 1}



def test_official_openai_client_works_unchanged_and_is_metered(gateway: GatewayHandle, sim: SimHandle) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="sk-client", max_retries=0))
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}])
    completion = client.completions.create(model="gpt-4o-mini", prompt="once upon a time", max_tokens=20)
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "bc"])
    models = client.models.list()

    assert chat.choices[0].message.content
    assert completion.choices[0].text
    assert len(embedding.data) == 2
    assert "gpt-4o-mini" in {m.id for m in models.data}
    assert chat.usage is not None and completion.usage is not None

    def count(op: str) -> float:
        return gateway.sample("tokenbooth_requests_total", operation=op, outcome="success")

    assert (count("chat"), count("text_completion"), count("embeddings")) == (1, 1, 1)
    expected_input = chat.usage.prompt_tokens + completion.usage.prompt_tokens + embedding.usage.prompt_tokens
    expected_output = chat.usage.completion_tokens + completion.usage.completion_tokens
    assert gateway.sample("tokenbooth_tokens_total", type="input") == expected_input
    assert gateway.sample("tokenbooth_tokens_total", type="output") == expected_output

    expected_cost = sum(
        (calc_price(Usage(input_tokens=u.prompt_tokens, output_tokens=getattr(u, "completion_tokens", 0)),
                    model, provider_id="openai").total_price
         for u, model in ((chat.usage, "gpt-4o-mini"), (completion.usage, "gpt-4o-mini"),
                          (embedding.usage, "text-embedding-3-small"))),
        Decimal(0),
    )
    assert gateway.sample("tokenbooth_cost_usd_total") == pytest.approx(float(expected_cost), abs=1e-12)
    rows = gateway.rows()
    assert len(rows) == 3
    assert sum(r.cost_usd for r in rows) == expected_cost


HAND_SAMPLE = [
    # (model, upstream usage, hand-computed cost in USD)
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M
    ("gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 500},
     Decimal(1000) * Decimal("0.15") / 10**6 + Decimal(500) * Decimal("0.6") / 10**6),
    # gpt-4o with 1024 cached of 3000 input: cached at $1.25, the rest at $2.50, output $10
    ("gpt-4o", {"prompt_tokens": 3000, "completion_tokens": 200, "prompt_tokens_details": {"cached_tokens": 1024}},
     Decimal(1976) * Decimal("2.5") / 10**6 + Decimal(1024) * Decimal("1.25") / 10**6
     + Decimal(200) * Decimal(10) / 10**6),
    # o3-mini with 300 reasoning of 700 output: reasoning bills as output ($4.40), input $1.10
    ("o3-mini",
     {"prompt_tokens": 400, "completion_tokens": 700, "completion_tokens_details": {"reasoning_tokens": 300}},
     Decimal(400) * Decimal("1.1") / 10**6 + Decimal(700) * Decimal("4.4") / 10**6),
    # relay priced in CNY by the price file: 2 in, 8 out, 0.5 cached per 1M; 1 CNY = 0.14 USD
    ("relay-chat", {"prompt_tokens": 2000, "completion_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 1280}},
     (Decimal(720) * 2 + Decimal(1280) * Decimal("0.5") + Decimal(1000) * 8) / 10**6 * Decimal("0.14")),
]


def test_fixed_traffic_sample_matches_a_hand_computed_bill(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Any
) -> None:
    price_file = tmp_path / "prices.yaml"
    price_file.write_text(
        "models:\n  - model: relay-chat\n    currency: CNY\n    input: 2\n    output: 8\n    cached_input: 0.5\n"
    )
    gw = make_gateway(
        [{"name": "relay", "base_url": sim.url, "provider": "openai", "models": ["relay-chat"]},
         {"name": "openai", "base_url": sim.url, "provider": "openai", "models": ["*"]}],
        pricing={"price_file": str(price_file), "fx": {"CNY": "0.14"}},
    )
    sim.script([{"usage": usage} for _, usage, _ in HAND_SAMPLE])
    client = track(openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0))
    for model, _, _ in HAND_SAMPLE:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])

    rows = gw.rows()
    assert [r.model for r in rows] == [m for m, _, _ in HAND_SAMPLE]
    for row, (model, _, expected) in zip(rows, HAND_SAMPLE, strict=True):
        assert abs(row.cost_usd - expected) < Decimal("1e-9"), model
        assert gw.sample("tokenbooth_cost_usd_total", model=model) == pytest.approx(float(expected), abs=1e-9)
    relay = rows[-1]
    assert (relay.currency, relay.price_source, relay.upstream) == ("CNY", "price-file", "relay")
    assert relay.cost == Decimal("0.01008")  # 720*2 + 1280*0.5 + 1000*8 per 1M, in CNY, exact
    assert rows[1].cached_input_tokens == 1024 and rows[2].reasoning_tokens == 300
    total = sum((e for _, _, e in HAND_SAMPLE), Decimal(0))
    assert abs(sum(r.cost_usd for r in rows) - total) < Decimal("1e-9")


def test_unknown_price_is_unpriced_never_zero(gateway: GatewayHandle) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    client.chat.completions.create(model="my-private-model-7b", messages=[{"role": "user", "content": "x"}])
    row = gateway.rows()[0]
    assert row.cost_usd is None and row.cost is None and row.input_tokens > 0
    assert gateway.sample("tokenbooth_unpriced_requests_total", model="other") == 1
    # an unknown model name is folded into "other": a typo never mints a series
    assert gateway.sample("tokenbooth_requests_total", model="my-private-model-7b") == 0


def _error(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


def _good_call(gw: GatewayHandle) -> None:
    r = httpx.post(f"{gw.url}/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ok"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": 5, "messages": []}', 400, "model"),
        (b'{"model": "gpt-4o-mini"}', 400, "messages"),
        (b'{"model": "gpt-4o-mini", "messages": [], "stream": "yes"}', 400, "stream"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(
    gateway: GatewayHandle, body: bytes, status: int, param: str | None
) -> None:
    r = httpx.post(f"{gateway.url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert r.headers["x-request-id"]
    _good_call(gateway)


def test_unknown_model_and_route_are_404(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway([{"name": "only", "base_url": sim.url, "models": ["gpt-4o-mini"]}])
    r = httpx.post(f"{gw.url}/chat/completions", json={"model": "gpt-5-typo", "messages": []})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    r = httpx.get(f"{gw.base}/v2/nothing")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = httpx.post(f"{gw.url}/models")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    models = httpx.get(f"{gw.url}/models").json()
    assert [m["id"] for m in models["data"]] == ["gpt-4o-mini"]
    _good_call(gw)


@pytest.mark.parametrize(
    ("action", "status", "error_type"),
    [
        ({"status": 429, "retry_after": 3}, 429, "rate_limited"),
        ({"status": 500}, 500, "server_error"),
        ({"status": 503}, 503, "server_error"),
        ({"status": 400, "code": "context_length_exceeded", "message": "maximum context length is 8192"},
         400, "context_length"),
        ({"status": 401}, 401, "auth"),
        ({"fault": "malformed"}, 502, "invalid_response"),
        ({"fault": "reset"}, 502, "connection"),
    ],
)
def test_upstream_failures_are_passed_through_classified_and_recorded(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle, action: dict[str, Any], status: int,
    error_type: str
) -> None:
    gateway = make_gateway([{"name": "sim", "base_url": sim.url, "retry": NO_RETRY}])
    sim.script([action])
    r = httpx.post(f"{gateway.url}/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == status
    err = _error(r)
    if "status" in action:  # the upstream's own body, untouched
        assert err["message"] == action.get("message", f"simulated {action['status']}")
        if status == 429:
            assert r.headers.get("content-type", "").startswith("application/json")
            assert r.headers["retry-after"] == "3"
    else:
        assert err["type"] == "upstream_error"
    assert gateway.sample("tokenbooth_requests_total", outcome="error", error_type=error_type) == 1
    row = gateway.rows()[0]
    assert (row.outcome, row.error_type) == ("error", error_type)
    _good_call(gateway)


def test_unreachable_upstream_is_502_and_timeout_is_504(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle
) -> None:
    from tokenbooth.gateway.server import bind_socket

    dead = bind_socket("127.0.0.1", 0)  # bound, never listening: connections are refused
    dead_port = dead.getsockname()[1]
    gw = make_gateway([
        {"name": "dead", "base_url": f"http://127.0.0.1:{dead_port}/v1", "models": ["dead-model"]},
        {"name": "slow", "base_url": sim.url, "models": ["*"], "timeout": {"read": 0.3}},
    ])
    r = httpx.post(f"{gw.url}/chat/completions", json={"model": "dead-model", "messages": []})
    assert r.status_code == 502 and _error(r)["code"] == "upstream_unreachable"
    assert "dead" in _error(r)["message"]
    sim.script([{"fault": "timeout", "seconds": 2}])
    r = httpx.post(f"{gw.url}/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert r.status_code == 504 and _error(r)["code"] == "upstream_timeout"
    assert gw.sample("tokenbooth_requests_total", error_type="connection") == 1
    assert gw.sample("tokenbooth_requests_total", error_type="timeout_read") == 1
    _good_call(gw)
    dead.close()


def test_upstream_key_never_leaks_into_errors_metrics_ledger_or_logs(
    make_gateway: Callable[..., GatewayHandle], sim: SimHandle, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-upstream-SECRET-4f9a2b"
    monkeypatch.setenv("SIM_KEY", secret)
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "api_key_env": "SIM_KEY", "models": ["*"],
                        "retry": NO_RETRY}])
    seen = sim.spy_headers()
    caplog.set_level(logging.DEBUG)
    sim.script([{"status": 500, "message": "boom"}, {"fault": "malformed"}, {}])
    texts = []
    for _ in range(3):
        r = httpx.post(f"{gw.url}/chat/completions", headers={"Authorization": "Bearer client-key"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        texts.append(r.text + str(r.headers))
    assert [h["authorization"] for h in seen] == [f"Bearer {secret}"] * 3  # the configured key replaces the client's
    texts.append(httpx.get(f"{gw.base}/metrics").text)
    texts.append(repr([tuple(r) for r in gw.rows()]))
    texts.append(caplog.text)
    for text in texts:
        assert secret not in text


def test_client_authorization_is_passed_through_without_upstream_key(gateway: GatewayHandle, sim: SimHandle) -> None:
    seen = sim.spy_headers()
    _ = httpx.post(f"{gateway.url}/chat/completions", headers={"Authorization": "Bearer sk-user"},
                   json={"model": "gpt-4o-mini", "messages": []})
    assert [h["authorization"] for h in seen] == ["Bearer sk-user"]


def test_stream_is_passed_through_unbuffered_and_metered(make_sim: Callable[..., SimHandle],
                                                          make_gateway: Callable[..., GatewayHandle]) -> None:
    slow = make_sim(ttft_ms=200, token_ms=50)
    gw = make_gateway([{"name": "sim", "base_url": slow.url, "models": ["*"]}])
    client = track(openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0))
    import time

    t0 = time.perf_counter()
    arrivals = []
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                            stream=True, max_tokens=10, stream_options={"include_usage": True})
    text = []
    usage = None
    for chunk in stream:
        arrivals.append(time.perf_counter() - t0)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and len(text) == 10
    # chunks arrive spread over the stream, not all at once at the end
    assert arrivals[-1] - arrivals[1] > 0.3
    row = gw.rows()[0]
    assert row.streamed and row.outcome == "success"
    assert row.output_tokens == usage.completion_tokens == 10
    assert 0.15 < row.ttft_s < 0.5
    assert gw.sample("tokenbooth_time_to_first_token_seconds_count") == 1


def test_a_session_header_attributes_the_call_to_an_agent_session(gateway: GatewayHandle) -> None:
    import tokenbooth

    with tokenbooth.agent_session("via-gateway", registry=CollectorRegistry()) as session:
        client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                       extra_headers=session.headers)
    (row,) = gateway.rows()
    assert row.session_id == session.session_id


def test_the_ledger_settings_reach_the_writer(make_gateway: Callable[..., GatewayHandle], sim: SimHandle,
                                              tmp_path: Path) -> None:
    spill = tmp_path / "spills" / "rows.jsonl"
    gw = make_gateway([{"name": "default", "base_url": sim.url}],
                      ledger={"url": f"sqlite:///{tmp_path / 'l.db'}", "spill_path": str(spill), "max_queue": 123,
                              "batch_size": 7})
    writer = gw.gateway.ledger
    assert writer is not None
    assert (writer.spill_path, writer.max_queue, writer.batch_size) == (spill, 123, 7)


def test_the_gateways_own_refusals_are_counted_by_reason(gateway: GatewayHandle, sim: SimHandle) -> None:
    url = gateway.url
    assert httpx.post(f"{url}/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(f"{url}/chat/completions", json={"messages": []}).status_code == 400
    assert httpx.post(f"{url}/models").status_code == 404  # the gateway's own path: not passed through
    assert httpx.get(f"{gateway.base}/v2/nothing").status_code == 404
    assert gateway.sample("tokenbooth_rejected_requests_total", reason="invalid_request") == 2
    assert gateway.sample("tokenbooth_rejected_requests_total", reason="not_found") == 2
    assert sim.stats()["total"] == 0
