"""What hostile or broken upstreams and clients cannot do to the gateway (issue 17)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import GatewayHandle, SimHandle

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def test_absurd_usage_from_an_upstream_is_estimated_flagged_counted_and_never_stops_the_ledger(
        gateway: GatewayHandle, sim: SimHandle) -> None:
    absurd = {"prompt_tokens": 10**18, "completion_tokens": 5, "total_tokens": 10**18 + 5}
    sim.script([{}, {"usage": absurd}, {}, {"usage": absurd}])
    for _ in range(5):
        assert httpx.post(f"{gateway.url}/chat/completions", json=CHAT).status_code == 200
    rows = gateway.rows()
    assert len(rows) == 5  # every call written: the bad ones too, and all after them
    bad = [r for r in rows if r.tokens_estimated]
    assert len(bad) == 2
    for r in bad:
        assert 0 < r.input_tokens < 100 and r.cost_usd is not None and r.cost_usd < 0.001
    assert gateway.sample("tokenbooth_usage_rejected_total", provider="openai") == 2
    assert gateway.sample("tokenbooth_tokens_total", type="input") < 1000  # the metrics never show 1e18
    assert gateway.sample("tokenbooth_ledger_rows_total", result="failed") == 0


def test_an_upstream_error_quoting_the_upstream_key_reaches_the_client_redacted(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-upstream-secret-0123456789"
    monkeypatch.setenv("SIM_KEY", key)
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "api_key_env": "SIM_KEY"}])
    quoted = {"status": 401, "message": f"Incorrect API key provided: {key}."}
    sim.script([quoted, quoted])
    chat = httpx.post(f"{gw.url}/chat/completions", json=CHAT)
    moderation = httpx.post(f"{gw.url}/moderations", json={"input": "hi"})  # passed through
    for r in (chat, moderation):
        assert r.status_code == 401
        assert key not in r.text and "Incorrect API key provided: [redacted]." in r.json()["error"]["message"]
    assert len(gw.rows()) == 2
