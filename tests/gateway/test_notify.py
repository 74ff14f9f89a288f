"""The Alertmanager webhook adapter, against local robots that check each chat platform's format."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayHandle, LoopThread, SimHandle

SECRET = "SEC-test-secret"
TOKEN = "access-token-that-must-not-leak"


class Robots:
    """DingTalk, WeCom, Feishu and Slack robots on one loopback server; each checks its own format."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.received: dict[str, list[dict[str, Any]]] = {k: [] for k in ("dingtalk", "wecom", "feishu", "slack")}
        self.secret: str | None = None
        self.fail_with: int | None = None
        app = web.Application()
        app.router.add_post("/robot/send", self.dingtalk)
        app.router.add_post("/cgi-bin/webhook/send", self.wecom)
        app.router.add_post("/open-apis/bot/v2/hook/{token}", self.feishu)
        app.router.add_post("/services/{a}/{b}/{c}", self.slack)
        self.runner, port = loop.serve(app)
        self.base = f"http://127.0.0.1:{port}"

    def url(self, kind: str) -> str:
        return {"dingtalk": f"{self.base}/robot/send?access_token={TOKEN}",
                "wecom": f"{self.base}/cgi-bin/webhook/send?key={TOKEN}",
                "feishu": f"{self.base}/open-apis/bot/v2/hook/{TOKEN}",
                "slack": f"{self.base}/services/T000/B000/{TOKEN}"}[kind]

    def stop(self) -> None:
        self.loop.run(self.runner.cleanup())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        assert request.content_type == "application/json"
        body: dict[str, Any] = orjson.loads(await request.read())
        return body

    async def dingtalk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        assert request.query["access_token"] == TOKEN
        assert set(body) == {"msgtype", "markdown"} and body["msgtype"] == "markdown"
        assert set(body["markdown"]) == {"title", "text"} and body["markdown"]["title"] and body["markdown"]["text"]
        if self.secret is not None:
            ts = request.query["timestamp"]
            assert abs(int(ts) / 1000 - time.time()) < 3600, "DingTalk refuses a timestamp over an hour off"
            expected = base64.b64encode(hmac.new(self.secret.encode(), f"{ts}\n{self.secret}".encode(),
                                                 hashlib.sha256).digest()).decode()
            if request.query["sign"] != expected:
                return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        else:
            assert "sign" not in request.query
        self.received["dingtalk"].append(body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def wecom(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        assert set(body) == {"msgtype", "markdown"} and body["msgtype"] == "markdown"
        content = body["markdown"]["content"]
        assert set(body["markdown"]) == {"content"} and 0 < len(content.encode()) <= 4096
        self.received["wecom"].append(body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def feishu(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.fail_with:
            return web.json_response({"code": 9499, "msg": "Bad Request"}, status=self.fail_with)
        assert body["msg_type"] == "interactive"
        card = body["card"]
        assert card["header"]["title"]["tag"] == "plain_text" and card["header"]["title"]["content"]
        assert card["header"]["template"] in ("red", "orange", "green")
        assert card["elements"] and all(e["tag"] == "div" and e["text"]["tag"] == "lark_md" for e in card["elements"])
        if self.secret is not None:
            key = f"{body['timestamp']}\n{self.secret}".encode()
            if body.get("sign") != base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode():
                return web.json_response({"code": 19021, "msg": "sign match fail"})
        self.received["feishu"].append(body)
        return web.json_response({"code": 0, "msg": "success", "data": {}})

    async def slack(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        blocks = body.get("blocks")
        if not isinstance(body.get("text"), str) or not isinstance(blocks, list) or not 0 < len(blocks) <= 50:
            return web.Response(status=400, text="invalid_blocks")
        for block in blocks:
            if block["type"] == "header":
                assert block["text"]["type"] == "plain_text" and len(block["text"]["text"]) <= 150
            elif block["type"] == "section":
                assert block["text"]["type"] == "mrkdwn" and len(block["text"]["text"]) <= 3000
            else:
                assert block["type"] == "context"
        self.received["slack"].append(body)
        return web.Response(text="ok")


@pytest.fixture
def robots(loop_thread: LoopThread) -> Any:
    r = Robots(loop_thread)
    yield r
    r.stop()


def payload(status: str = "firing", count: int = 1, severity: str = "critical") -> dict[str, Any]:
    """An Alertmanager webhook (version 4) for TokenboothHighErrorRate on gpt-4o."""
    labels = {"alertname": "TokenboothHighErrorRate", "model": "gpt-4o", "provider": "openai",
              "severity": severity, "team": "platform"}
    alerts = [{"status": status, "labels": {**labels, "instance": f"gw-{i}"},
               "annotations": {"summary": "gpt-4o via openai: 50% of calls failing",
                               "description": "50% of calls to gpt-4o via openai failed over the last 5m. " * 3},
               "startsAt": "2026-11-24T05:00:00.000Z",
               "endsAt": "2026-11-24T05:10:00.000Z" if status == "resolved" else "0001-01-01T00:00:00Z",
               "generatorURL": "http://prometheus:9090/graph", "fingerprint": f"{i:016x}"} for i in range(count)]
    return {"version": "4", "groupKey": '{}:{alertname="TokenboothHighErrorRate"}', "truncatedAlerts": 0,
            "status": status, "receiver": "platform-chat", "groupLabels": {"alertname": "TokenboothHighErrorRate"},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "alerts": alerts}


def _text(kind: str, message: dict[str, Any]) -> str:
    if kind in ("dingtalk", "wecom"):
        return " ".join(str(v) for v in message["markdown"].values())
    if kind == "feishu":
        card = message["card"]
        return card["header"]["title"]["content"] + " " + " ".join(e["text"]["content"] for e in card["elements"])
    return message["text"] + " " + " ".join(str(b.get("text", "")) for b in message["blocks"])


@pytest.fixture
def gateway_for(make_gateway: Callable[..., GatewayHandle], sim: SimHandle, robots: Robots
                ) -> Callable[..., GatewayHandle]:
    def make(secret_env: str | None = None, **urls: str) -> GatewayHandle:
        notify: dict[str, Any] = {k: {"url": robots.url(k)} for k in ("dingtalk", "wecom", "feishu", "slack")}
        for kind, url in urls.items():
            notify[kind] = {"url": url}
        if secret_env:
            for kind in ("dingtalk", "feishu"):
                notify[kind]["secret_env"] = secret_env
        return make_gateway([{"name": "default", "base_url": sim.url}], notify=notify)

    return make


@pytest.mark.parametrize("kind", ["dingtalk", "wecom", "feishu", "slack"])
def test_each_robot_gets_its_format_firing_then_resolved(kind: str, gateway_for: Callable[..., GatewayHandle],
                                                         robots: Robots) -> None:
    gw = gateway_for()
    url = f"{gw.base}/alertmanager/webhook/{kind}"
    firing = httpx.post(url, json=payload("firing", count=2))
    assert firing.status_code == 200, firing.text
    assert firing.json() == {"status": "sent", "robot": kind}
    resolved = httpx.post(url, json=payload("resolved", count=2))
    assert resolved.status_code == 200, resolved.text
    first, second = (_text(kind, m) for m in robots.received[kind])
    assert "[FIRING:2] TokenboothHighErrorRate gpt-4o" in first
    assert "CRITICAL" in first and "gpt-4o via openai: 50% of calls failing" in first
    assert "[RESOLVED] TokenboothHighErrorRate gpt-4o" in second and "RESOLVED" in second.replace("[RESOLVED]", "")
    assert "from 2026-11-24 05:00:00 to 2026-11-24 05:10:00 UTC" in second
    if kind == "feishu":
        assert [m["card"]["header"]["template"] for m in robots.received[kind]] == ["red", "green"]
    for other in set(robots.received) - {kind}:
        assert robots.received[other] == []


def test_dingtalk_and_feishu_are_signed_with_the_secret_from_the_environment(
        gateway_for: Callable[..., GatewayHandle], robots: Robots, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_TEST_ROBOT_SECRET", SECRET)
    robots.secret = SECRET
    gw = gateway_for(secret_env="TB_TEST_ROBOT_SECRET")
    for kind in ("dingtalk", "feishu"):
        resp = httpx.post(f"{gw.base}/alertmanager/webhook/{kind}", json=payload())
        assert resp.status_code == 200, resp.text
        assert len(robots.received[kind]) == 1
    robots.secret = "a different secret"  # the robot's secret was rotated: it refuses, the gateway says so
    for kind in ("dingtalk", "feishu"):
        resp = httpx.post(f"{gw.base}/alertmanager/webhook/{kind}", json=payload())
        assert resp.status_code == 502
        message = resp.json()["error"]["message"]
        assert message.startswith(f"The {kind} robot refused the message")
        assert TOKEN not in resp.text and SECRET not in resp.text


def test_wecom_messages_stay_within_4096_bytes(gateway_for: Callable[..., GatewayHandle], robots: Robots) -> None:
    gw = gateway_for()
    resp = httpx.post(f"{gw.base}/alertmanager/webhook/wecom", json=payload("firing", count=40))
    assert resp.status_code == 200, resp.text
    content = robots.received["wecom"][0]["markdown"]["content"]
    assert len(content.encode()) <= 4096 and content.startswith('## <font color="warning">[FIRING:40]')


def test_many_alerts_are_summarised(gateway_for: Callable[..., GatewayHandle], robots: Robots) -> None:
    gw = gateway_for()
    assert httpx.post(f"{gw.base}/alertmanager/webhook/slack", json=payload("firing", count=25)).status_code == 200
    assert "... and 15 more" in _text("slack", robots.received["slack"][0])


def test_bad_requests_and_failing_robots_get_clear_errors(gateway_for: Callable[..., GatewayHandle],
                                                          robots: Robots, make_gateway: Callable[..., GatewayHandle],
                                                          sim: SimHandle) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/robot/send?access_token={TOKEN}"
    gw = gateway_for(dingtalk=closed)
    base = f"{gw.base}/alertmanager/webhook"
    cases = [
        (httpx.post(f"{base}/teams", json=payload()), 404, "Unknown chat robot 'teams': use one of dingtalk"),
        (httpx.get(f"{base}/slack"), 405, "Use POST for /alertmanager/webhook/slack."),
        (httpx.post(f"{base}/slack", content=b"{not json"), 400, "The webhook body is not JSON"),
        (httpx.post(f"{base}/slack", json={"alerts": "x"}), 400, "is not an Alertmanager notification"),
        (httpx.post(f"{base}/dingtalk", json=payload()), 502, "The dingtalk robot is unreachable"),
    ]
    robots.fail_with = 400
    cases.append((httpx.post(f"{base}/feishu", json=payload()), 502, "The feishu robot answered HTTP 400"))
    for resp, status, message in cases:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["message"].startswith(message) or message in resp.json()["error"]["message"]
        assert TOKEN not in resp.text
    bare = make_gateway([{"name": "default", "base_url": sim.url}])
    resp = httpx.post(f"{bare.base}/alertmanager/webhook/wecom", json=payload())
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "No wecom robot is configured: set notify.wecom.url."


def test_robots_honour_the_environment_proxy_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenbooth.config import ConfigError, NotifyConfig
    from tokenbooth.gateway.notify import Notifier

    config = NotifyConfig.model_validate({"dingtalk": {"url": f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}"},
                                          "slack": {"url": "http://127.0.0.1:9/hook"}})
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "")
    pools = Notifier(config)._pools
    assert pools["dingtalk"].proxy == ("proxy.corp", 3128) and pools["dingtalk"].tls
    assert pools["slack"].proxy is None  # loopback goes direct
    monkeypatch.setenv("NO_PROXY", ".dingtalk.com")
    assert Notifier(config)._pools["dingtalk"].proxy is None
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:secret@proxy.corp:1080")
    with pytest.raises(ConfigError, match=r"notify\.dingtalk: the environment.s proxy") as caught:
        Notifier(config)
    assert "secret" not in str(caught.value) and TOKEN not in str(caught.value)


def test_posts_to_a_robot_reuse_one_keep_alive_connection(gateway_for: Callable[..., GatewayHandle],
                                                           robots: Robots) -> None:
    gw = gateway_for()
    for _ in range(3):
        assert httpx.post(f"{gw.base}/alertmanager/webhook/slack", json=payload()).status_code == 200
    pool = gw.gateway.notifier._pools["slack"]
    assert len(robots.received["slack"]) == 3
    assert len(pool.idle) == 1 and not pool.idle[0].closed
