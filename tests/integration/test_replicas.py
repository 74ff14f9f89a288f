"""Two gateway processes sharing one Redis and one PostgreSQL ledger: budgets, rate limits and
keys enforced across replicas, and Redis failing under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import RedisServer, free_port
from tests.integration.conftest import TB
from tests.integration.test_cli import _wait_http
from tokenbooth.ledger.schema import calls

CHAT = {"model": "flat-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
PRICES = "models:\n  - model: flat-model\n    input: 0\n    output: 0\n    per_request: 0.05\n"  # 0.05 USD a call


class Replica:
    """One `tokenbooth serve` process on the shared config."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
        env["TB_TEST_UPSTREAM_KEY"] = "sk-upstream-for-replicas"
        self.proc = subprocess.Popen([*TB, "serve", "--config", str(config), "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _wait_http(f"{self.base}/healthz", self.proc, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.base}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in "{ "
                   and all(f'{k}="{v}"' in line for k, v in labels.items()))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


class Cluster:
    def __init__(self, tmp: Path, sim_url: str, pg_url: str, redis_url: str, tenants: str) -> None:
        (tmp / "prices.yaml").write_text(PRICES)
        self.config = tmp / "tokenbooth.yaml"
        self.config.write_text(
            f"upstreams:\n  - {{name: sim, base_url: '{sim_url}', api_key_env: TB_TEST_UPSTREAM_KEY}}\n"
            f"auth: {{mode: keys, refresh_interval: 0.5}}\n"
            f"ledger: {{url: '{pg_url}', flush_interval: 0.05}}\n"
            f"pricing: {{price_file: '{tmp / 'prices.yaml'}'}}\n"
            f"redis: {{url: '{redis_url}', timeout: 0.2, retry_interval: 0.3}}\n"
            f"tenants:\n{tenants}")
        self.pg_url = pg_url
        self.replicas = [Replica(self.config), Replica(self.config)]

    def key(self, tenant: str, *extra: str) -> tuple[str, str]:
        """A new key (id, secret) made with the CLI, as an operator would."""
        out = subprocess.run([*TB, "keys", "create", "--tenant", tenant, "--config", str(self.config), *extra],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return out[0].split()[2], out[-1]

    def stop(self) -> list[str]:
        errs = []
        for r in self.replicas:
            code, err = r.stop()
            assert code == 0, err
            errs.append(err)
        return errs

    def rows(self) -> list[Any]:
        engine = sa.create_engine(self.pg_url)
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(calls)).all())
        engine.dispose()
        return rows


async def _burst(bases: list[str], secret: str, per_replica: int) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """``per_replica`` concurrent clients on each replica, one call each, all at once."""
    start = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(base: str) -> tuple[int, dict[str, Any], dict[str, str]]:
            await start.wait()
            async with session.post(f"{base}/v1/chat/completions", json=CHAT,
                                    headers={"authorization": f"Bearer {secret}"}) as resp:
                return resp.status, await resp.json(), {k.lower(): v for k, v in resp.headers.items()}

        tasks = [asyncio.ensure_future(one(b)) for b in bases for _ in range(per_replica)]
        await asyncio.sleep(0.2)  # every client connected and waiting
        start.set()
        return await asyncio.gather(*tasks)


@pytest.fixture
def cluster_parts(tmp_path: Path, sim_url: str, pg_url: str, redis_server: RedisServer) -> tuple[Path, str, str, str]:
    return tmp_path, sim_url, pg_url, redis_server.url


def test_a_hard_budget_holds_across_two_replicas_under_100_concurrent_calls(
        cluster_parts: tuple[Path, str, str, str]) -> None:
    c = Cluster(*cluster_parts, tenants="  acme: {budgets: ['1/month']}\n")  # 20 calls of 0.05
    try:
        _, secret = c.key("acme")
        time.sleep(1)  # both replicas refresh their keys
        answers = asyncio.run(_burst([r.base for r in c.replicas], secret, 50))
    finally:
        c.stop()
    ok = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    assert 18 <= len(ok) <= 20, len(ok)
    assert all(status == 429 and body["error"]["code"] == "budget_exceeded" and h["x-should-retry"] == "false"
               for status, body, h in refused)
    rows = c.rows()
    assert len(rows) == len(ok)
    assert {r.tenant for r in rows} == {"acme"}
    assert sum(r.cost_usd for r in rows) <= Decimal("1.00")


def test_an_rpm_limit_is_shared_by_two_replicas(cluster_parts: tuple[Path, str, str, str]) -> None:
    c = Cluster(*cluster_parts, tenants="  acme: {limits: {rpm: 30}}\n")
    try:
        _, secret = c.key("acme")
        time.sleep(1)
        t0 = time.monotonic()
        answers = asyncio.run(_burst([r.base for r in c.replicas], secret, 30))
        elapsed = time.monotonic() - t0
    finally:
        c.stop()
    assert elapsed < 2  # the bucket refills 0.5 calls a second: under 2 s it adds none
    ok = [a for a in answers if a[0] == 200]
    assert 28 <= len(ok) <= 30, len(ok)
    for status, body, headers in answers:
        if status != 200:
            assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", (body, headers)
            assert int(headers["retry-after"]) >= 1


def test_a_key_revoked_while_both_replicas_run_is_refused_by_both(cluster_parts: tuple[Path, str, str, str],
                                                                  sim_url: str) -> None:
    c = Cluster(*cluster_parts, tenants="  acme: {}\n")
    try:
        key_id, secret = c.key("acme")
        time.sleep(1)
        headers = {"authorization": f"Bearer {secret}"}
        for r in c.replicas:
            assert httpx.post(f"{r.base}/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        subprocess.run([*TB, "keys", "revoke", key_id, "--config", str(c.config)], check=True, capture_output=True)
        deadline = time.monotonic() + 5
        for r in c.replicas:
            while (status := httpx.post(f"{r.base}/v1/chat/completions", json=CHAT, headers=headers).status_code) \
                    == 200:
                assert time.monotonic() < deadline, "a revoked key still works after 5 s"
                time.sleep(0.1)
            assert status == 401
        upstream_before = httpx.get(sim_url.removesuffix("/v1") + "/_sim/stats").json()["total"]
        for bad in ({}, {"authorization": "Bearer tb-" + "0" * 43}, headers):
            answers = [httpx.post(f"{r.base}/v1/chat/completions", json=CHAT, headers=bad) for r in c.replicas]
            assert {a.status_code for a in answers} == {401}
            assert {a.json()["error"]["code"] for a in answers} == {"invalid_api_key"}
        upstream_after = httpx.get(sim_url.removesuffix("/v1") + "/_sim/stats").json()["total"]
        metrics = "".join(httpx.get(f"{r.base}/metrics").text for r in c.replicas)
    finally:
        logs = c.stop()
    assert upstream_after == upstream_before  # the refused calls reached nothing
    engine = sa.create_engine(c.pg_url)
    with engine.connect() as conn:
        tables = str([conn.execute(sa.text(f"SELECT * FROM {t}")).all()
                      for t in ("tokenbooth_calls", "tokenbooth_keys", "tokenbooth_meta")])
    engine.dispose()
    for text in (tables, metrics, *logs):
        assert secret not in text and secret[3:] not in text


def test_redis_stopped_under_load_keeps_every_call_answered_and_recorded(
        cluster_parts: tuple[Path, str, str, str], redis_server: RedisServer) -> None:
    c = Cluster(*cluster_parts, tenants="  acme: {budgets: ['1000000/month'], limits: {rpm: 100000}}\n")
    statuses: dict[int, int] = {}
    answered: list[str] = []
    try:
        _, secret = c.key("acme")
        time.sleep(1)

        async def load(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            async with aiohttp.ClientSession() as session:
                async def worker(base: str) -> None:
                    while time.monotonic() < deadline:
                        async with session.post(f"{base}/v1/chat/completions", json=CHAT,
                                                headers={"authorization": f"Bearer {secret}"}) as resp:
                            body = await resp.json()  # every answer is JSON: OpenAI's format
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1
                            if resp.status == 200:
                                answered.append(resp.headers["x-request-id"])
                            else:
                                assert set(body["error"]) >= {"message", "type", "code"}

                await asyncio.gather(*(worker(r.base) for r in c.replicas for _ in range(4)))

        async def chaos() -> None:
            await asyncio.sleep(1.5)
            redis_server.stop()
            await asyncio.sleep(2)
            assert [r.metric("tokenbooth_redis_up") for r in c.replicas] == [0, 0]
            redis_server.start()

        async def both() -> None:
            await asyncio.gather(load(6), chaos())

        asyncio.run(both())
        time.sleep(0.5)
        up = [r.metric("tokenbooth_redis_up") for r in c.replicas]
        errors = sum(r.metric("tokenbooth_redis_errors_total") for r in c.replicas)
        # enforcement is shared again: a fresh RPM limit of 2 across both replicas holds
        _, tight = c.key("acme", "--rpm", "2")
        time.sleep(1)
        tight_statuses = [httpx.post(f"{r.base}/v1/chat/completions", json=CHAT,
                                     headers={"authorization": f"Bearer {tight}"}).status_code
                          for r in c.replicas for _ in range(2)]
        alive = [r.proc.poll() is None for r in c.replicas]
    finally:
        logs = c.stop()
    assert alive == [True, True]
    assert up == [1, 1] and errors > 0, logs
    assert set(statuses) == {200}, statuses  # nothing refused: the budget and limit are wide
    assert sorted(tight_statuses) == [200, 200, 429, 429]
    ledger_ids = {r.request_id for r in c.rows()}
    assert set(answered) <= ledger_ids and len(answered) > 100
    assert all("Traceback" not in log for log in logs)
    assert any("Redis is unreachable" in log for log in logs)
