"""Keys, tenants, budgets and rate limits in one gateway process (in-process state), end to end."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.conftest import GatewayHandle, SimHandle, track
from tokenbooth.config import BudgetConfig, LimitsConfig, load_settings
from tokenbooth.control.keys import KeyStore
from tokenbooth.errors import ConfigError
from tokenbooth.gateway.app import build_gateway
from tokenbooth.ledger.report import report
from tokenbooth.ledger.schema import connect

CHAT = {"model": "flat-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
# every call of flat-model costs exactly 0.05 USD, whatever its tokens: budgets in whole calls
PRICES = "models:\n  - model: flat-model\n    input: 0\n    output: 0\n    per_request: 0.05\n"


class Keyed:
    """A gateway in keys mode with its own ledger, and a key store on that ledger."""

    def __init__(self, make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path,
                 **overrides: Any) -> None:
        db = f"sqlite:///{tmp_path / 'ledger.db'}"
        (tmp_path / "prices.yaml").write_text(PRICES)
        self.store = KeyStore(connect(db))
        self.make = lambda: make_gateway(
            [{"name": "sim", "base_url": sim.url, "api_key_env": "SIM_UPSTREAM_KEY"}],
            ledger={"url": db, "flush_interval": 0.05}, pricing={"price_file": str(tmp_path / "prices.yaml")},
            **{"auth": {"mode": "keys", "refresh_interval": 0.1}, **overrides})
        self.gw: GatewayHandle | None = None

    def key(self, tenant: str = "acme", **kw: Any) -> str:
        return self.store.create(tenant, **kw)[1]

    def start(self) -> GatewayHandle:
        self.gw = self.make()
        return self.gw

    def post(self, key: str | None, body: dict[str, Any] = CHAT, path: str = "chat/completions",
             **headers: str) -> httpx.Response:
        assert self.gw is not None
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(f"{self.gw.url}/{path}", json=body, headers=headers, timeout=30)


@pytest.fixture
def keyed(make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Callable[..., Keyed]:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-upstream-secret")
    return lambda **overrides: Keyed(make_gateway, sim, tmp_path, **overrides)


def test_calls_without_a_valid_key_get_401_and_never_reach_the_upstream(keyed: Callable[..., Keyed],
                                                                      sim: SimHandle) -> None:
    k = keyed()
    good = k.key()
    gone, revoked = k.store.create("acme")
    k.store.revoke(gone.id)
    expired = k.key(expires_at=gone.created_at)
    gw = k.start()
    answers = [k.post(None), k.post("tb-" + "x" * 43), k.post("sk-not-ours"), k.post(revoked), k.post(expired)]
    assert [r.status_code for r in answers] == [401] * 5
    for r in answers:
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    anth = httpx.post(f"{gw.base}/v1/messages", headers={"x-api-key": "tb-wrongwrongwrongwrongwrong",
                                                          "anthropic-version": "2023-06-01"},
                      json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []})
    assert anth.status_code == 401 and anth.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{gw.url}/models").status_code == 401
    assert sim.stats()["total"] == 0
    assert gw.sample("tokenbooth_rejected_requests_total", reason="auth") == 7
    assert gw.sample("tokenbooth_requests_total") == 0
    assert k.post(good).status_code == 200
    assert httpx.get(f"{gw.base}/metrics").status_code == 200 and httpx.get(f"{gw.base}/healthz").status_code == 200


def test_a_keyed_call_is_billed_to_its_tenant_and_the_key_never_travels(
        keyed: Callable[..., Keyed], sim: SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    k = keyed()
    made, secret = k.store.create("acme", name="ci")
    key_id = made.id
    gw = k.start()
    seen = sim.spy_headers()
    client = track(openai.OpenAI(base_url=gw.url, api_key=secret, max_retries=0))
    client.chat.completions.create(**CHAT)
    claude = track(anthropic.Anthropic(base_url=gw.base, api_key=secret, max_retries=0))
    claude.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert seen[0]["authorization"] == "Bearer sk-upstream-secret"
    assert all(secret not in str(h) for h in seen)
    rows = gw.rows()
    assert [(r.tenant, r.key_id) for r in rows] == [("acme", key_id)] * 2
    by_tenant = report(connect(gw.settings.ledger.url, create=False), "tenant")
    assert [(r.group, r.requests) for r in by_tenant] == [("acme", 2)]
    assert [(r.group, r.requests) for r in report(connect(gw.settings.ledger.url, create=False), "key")] == \
        [(key_id, 2)]
    engine = sa.create_engine(gw.settings.ledger.url)
    with engine.connect() as conn:
        dump = str([conn.execute(sa.text(f"SELECT * FROM {t}")).all()
                    for t in ("tokenbooth_calls", "tokenbooth_keys", "tokenbooth_meta")])
    engine.dispose()
    metrics = httpx.get(f"{gw.base}/metrics").text
    assert secret not in dump and secret not in metrics and secret not in caplog.text
    assert secret[3:] not in dump  # not even without its prefix


def test_a_key_revoked_while_the_gateway_runs_is_refused_within_seconds(keyed: Callable[..., Keyed]) -> None:
    k = keyed()
    secret = k.key()
    k.start()
    assert k.post(secret).status_code == 200
    k.store.revoke(k.store.list()[0].prefix)
    deadline = time.monotonic() + 5
    while k.post(secret).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key still worked after 5 s"
        time.sleep(0.05)
    assert k.post(secret).status_code == 401
    fresh = k.key()
    deadline = time.monotonic() + 5
    while k.post(fresh).status_code == 401:
        assert time.monotonic() < deadline, "a new key was not taken within 5 s"
        time.sleep(0.05)


def test_a_hard_budget_refuses_with_insufficient_quota_once_spent(keyed: Callable[..., Keyed], sim: SimHandle) -> None:
    k = keyed(tenants={"acme": {"budgets": ["0.25/month"]}})
    secret = k.key()
    gw = k.start()
    statuses = [k.post(secret).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    refused = k.post(secret)
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert refused.headers["x-should-retry"] == "false"
    for words in ("tenant 'acme'", "month", "limit 0.25 USD", "spent 0.25", "resets", "-01T00:00:00Z"):
        assert words in error["message"], error["message"]
    assert sim.stats()["total"] == 5
    assert gw.sample("tokenbooth_rejected_requests_total", reason="budget") == 3
    # budget gauges follow within a second (at once on a refusal)
    assert gw.sample("tokenbooth_budget_spent_usd", tenant="acme", window="month") == pytest.approx(0.25)
    assert gw.sample("tokenbooth_budget_limit_usd", tenant="acme", window="month") == pytest.approx(0.25)
    assert gw.sample("tokenbooth_budget_used_ratio", tenant="acme", window="month") == pytest.approx(1)
    assert sum(r.cost_usd for r in gw.rows()) == Decimal("0.25")


def test_a_budget_is_seeded_from_the_ledger_on_start(keyed: Callable[..., Keyed]) -> None:
    k = keyed(tenants={"acme": {"budgets": ["0.25/month"]}})
    secret = k.key()
    gw = k.start()
    assert [k.post(secret).status_code for _ in range(3)] == [200] * 3
    gw.flush()
    gw.stop()
    k.start()  # a restart does not reset the month
    assert [k.post(secret).status_code for _ in range(3)] == [200, 200, 429]


def test_a_keys_own_budget_in_cny_is_charged_through_fx(keyed: Callable[..., Keyed]) -> None:
    k = keyed()  # 0.05 USD a call = 0.357142... CNY at 0.14 USD per CNY
    secret = k.key(budgets=(BudgetConfig.model_validate("1CNY/day"),))
    k.start()
    assert [k.post(secret).status_code for _ in range(3)] == [200, 200, 429]
    assert "key key_" in k.post(secret).json()["error"]["message"]


def test_rate_limits_answer_429_with_retry_after_and_every_answer_carries_the_headers(
        keyed: Callable[..., Keyed], sim: SimHandle) -> None:
    k = keyed(tenants={"acme": {"limits": {"rpm": 100}}})
    secret = k.key(limits=LimitsConfig(rpm=3))
    gw = k.start()
    answers = [k.post(secret) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers[:3]] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in answers[:3])  # the tightest of the two
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = answers[3]
    error = refused.json()["error"]
    assert (refused.status_code, error["code"], error["type"]) == (429, "rate_limit_exceeded", "requests")
    assert 1 <= int(refused.headers["retry-after"]) <= 20 and "x-should-retry" not in refused.headers
    assert "RPM" in error["message"] and "limit 3" in error["message"]
    assert sim.stats()["total"] == 3
    assert gw.sample("tokenbooth_rejected_requests_total", reason="rate_limit") == 1


def test_tpm_counts_the_prompt_and_max_tokens_and_refuses_a_request_too_large(keyed: Callable[..., Keyed]) -> None:
    k = keyed()
    secret = k.key(limits=LimitsConfig(tpm=1000))
    k.start()
    ok = k.post(secret, {**CHAT, "max_tokens": 100})
    assert ok.status_code == 200 and int(ok.headers["x-ratelimit-remaining-tokens"]) < 900
    big = k.post(secret, {**CHAT, "max_tokens": 5000})
    assert big.status_code == 429 and "too large" in big.json()["error"]["message"]
    assert big.json()["error"]["type"] == "tokens"


def test_concurrent_calls_past_the_cap_are_refused(make_sim: Callable[..., SimHandle],
                                                    make_gateway: Callable[..., GatewayHandle], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    slow = make_sim(ttft_ms=400)
    k = Keyed(make_gateway, slow, tmp_path)
    secret = k.key(limits=LimitsConfig(concurrency=2))
    gw = k.start()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda _: k.post(secret).status_code, range(4)))
    assert statuses == [200, 200, 429, 429]
    assert gw.sample("tokenbooth_rejected_requests_total", reason="concurrency") == 2
    assert k.post(secret).status_code == 200  # the slots came back


def test_a_stream_is_settled_at_its_real_cost_and_a_hang_up_at_what_was_billed(
        make_sim: Callable[..., SimHandle], make_gateway: Callable[..., GatewayHandle], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", "sk-up")
    slow = make_sim(ttft_ms=50, token_ms=20)
    k = Keyed(make_gateway, slow, tmp_path, tenants={"acme": {"budgets": ["1/day"]}})
    secret = k.key()
    gw = k.start()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a story"}], "stream": True,
            "max_tokens": 60}
    client = track(openai.OpenAI(base_url=gw.url, api_key=secret, max_retries=0))
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body) if c.choices)
    with httpx.stream("POST", f"{gw.url}/chat/completions", json={**body, "max_tokens": 200},
                      headers={"authorization": f"Bearer {secret}"}) as resp:
        for seen, _ in enumerate(resp.iter_lines()):
            if seen == 6:
                break
    gw.sample_seen("tokenbooth_requests_total", outcome="cancelled")
    rows = gw.rows()
    assert [r.outcome for r in rows] == ["success", "cancelled"] and rows[1].tokens_estimated
    spent = sum((r.cost_usd for r in rows), Decimal(0))
    assert spent > 0
    assert k.post(secret).status_code == 200  # the next admission sees the settled spend
    gauge = gw.sample_when("tokenbooth_budget_spent_usd", float(spent), tenant="acme", window="day")
    assert gauge == pytest.approx(float(spent), abs=1e-9)


def test_tenant_labels_are_capped_and_keys_never_become_labels(keyed: Callable[..., Keyed]) -> None:
    k = keyed(metrics={"tenant_labels": True, "max_tenants": 2}, tenants={"acme": {}})
    secrets = [k.key(t) for t in ("acme", "beta", "gamma", "delta")]
    gw = k.start()
    for s in secrets:
        assert k.post(s).status_code == 200
    tenants = {t: gw.sample("tokenbooth_requests_total", tenant=t) for t in ("acme", "beta", "gamma", "other")}
    assert tenants == {"acme": 1, "beta": 1, "gamma": 0, "other": 2}
    text = httpx.get(f"{gw.base}/metrics").text
    assert "key_" not in text and 'tenant="acme"' in text


def test_the_webhook_needs_the_admin_key_in_keys_mode(keyed: Callable[..., Keyed],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_ADMIN", "admin-secret-value")
    k = keyed(auth={"mode": "keys", "admin_key_env": "TB_ADMIN"})
    client_key = k.key()
    gw = k.start()
    url = f"{gw.base}/alertmanager/webhook/slack"
    assert httpx.post(url, json={"alerts": []}).status_code == 401
    assert httpx.post(url, json={"alerts": []}, headers={"authorization": f"Bearer {client_key}"}).status_code == 401
    admitted = httpx.post(url, json={"alerts": []}, headers={"authorization": "Bearer admin-secret-value"})
    assert admitted.status_code != 401


def test_an_open_gateway_off_loopback_with_an_upstream_key_refuses_to_start(tmp_path: Path) -> None:
    base = {"upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "X"}],
            "host": "0.0.0.0", "ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}", "enabled": False}}
    with pytest.raises(ConfigError, match=r"auth\.mode: keys"):
        build_gateway(load_settings(overrides=base, environ={}))
    build_gateway(load_settings(overrides={**base, "auth": {"mode": "open"}}, environ={}))  # on purpose: allowed
    no_key = {**base, "upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1"}]}
    build_gateway(load_settings(overrides=no_key, environ={}))  # clients bring their own upstream keys
    with pytest.raises(ConfigError, match=r"redis\.url"):
        build_gateway(load_settings(overrides={**base, "workers": 2, "auth": {"mode": "keys"}}, environ={}))


def test_a_key_budget_in_a_currency_without_a_rate_refuses_rather_than_fails(keyed: Callable[..., Keyed]) -> None:
    k = keyed()
    secret = k.key(budgets=(BudgetConfig.model_validate("5EUR/day"),))  # made around the CLI's own check
    gw = k.start()
    r = k.post(secret)
    assert r.status_code == 429 and "pricing.fx.EUR" in r.json()["error"]["message"]
    assert gw.sample("tokenbooth_requests_total") == 0
