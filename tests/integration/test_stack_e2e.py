"""The whole alerting path with real binaries, on loopback, in the fast profile (a second stands for a minute).

simulated upstream (5xx injected) → gateway → real Prometheus (generated rules) → real Alertmanager
(generated routes) → the gateway's webhook adapter → a local DingTalk robot that checks the format
and the signature. The robot must see the alert fire during the fault and resolve after it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayHandle, LoopThread, SimHandle, free_port
from tokenbooth.config import load_settings
from tokenbooth.stack.profile import FAST
from tokenbooth.stack.render import init_stack, stack_files
from tokenbooth.stack.tools import MissingTool, find_tool
from tokenbooth.stack.up import LocalStack, Ports

SECRET = "SEC-e2e"
ALERT = "TokenboothUpstreamServerErrors"


class DingTalkRobot:
    """A DingTalk robot on loopback: checks the message format and signature, keeps what arrives."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.bad: list[str] = []
        app = web.Application()
        app.router.add_post("/robot/send", self.send)
        self.runner, port = loop.serve(app)
        self.url = f"http://127.0.0.1:{port}/robot/send?access_token=e2e"

    def stop(self) -> None:
        self.loop.run(self.runner.cleanup())

    async def send(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        ts = request.query.get("timestamp", "")
        sign = base64.b64encode(hmac.new(SECRET.encode(), f"{ts}\n{SECRET}".encode(), hashlib.sha256).digest())
        if request.query.get("sign") != sign.decode() or body.get("msgtype") != "markdown" \
                or not body.get("markdown", {}).get("title") or not body["markdown"].get("text"):
            self.bad.append(repr(body))
            return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        self.messages.append((time.monotonic(), body["markdown"]))
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    def wait_for(self, prefix: str, timeout: float) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if message["title"].startswith(prefix):
                    return at, message
            time.sleep(0.1)
        titles = [m["title"] for _, m in self.messages]
        raise AssertionError(f"no DingTalk message starting {prefix!r} in {timeout:g} s; got {titles}, bad {self.bad}")


@pytest.fixture
def robot(loop_thread: LoopThread) -> Iterator[DingTalkRobot]:
    r = DingTalkRobot(loop_thread)
    yield r
    r.stop()


@pytest.fixture
def traffic() -> Iterator[Callable[[str], None]]:
    """Steady chat calls (~25 a second) to a gateway, on a thread, until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                client.post(f"{url}/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
                stop.wait(0.04)

    def start(url: str) -> None:
        thread = threading.Thread(target=run, args=(url,), daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


def test_5xx_fault_fires_then_resolves_in_dingtalk(
        make_sim: Callable[..., SimHandle], make_gateway: Callable[..., GatewayHandle], robot: DingTalkRobot,
        traffic: Callable[[str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("prometheus", "alertmanager", "pushgateway"):
        try:
            find_tool(tool)
        except MissingTool as exc:
            pytest.fail(exc.message)
    monkeypatch.setenv("TB_E2E_DINGTALK_SECRET", SECRET)
    sim = make_sim()
    # One attempt and no circuit breaker: the upstream's 5xx reach the metrics as they happen.
    gateway = make_gateway([{"name": "default", "base_url": sim.url, "retry": {"attempts": 1},
                             "circuit": {"enabled": False}}],
                           notify={"dingtalk": {"url": robot.url, "secret_env": "TB_E2E_DINGTALK_SECRET"}})
    directory = tmp_path / "stack"
    init_stack(directory, stack_files(load_settings(environ={}), profile=FAST, chat=["dingtalk"]))
    ports = Ports(free_port(), free_port(), free_port())
    with LocalStack(directory, gateway=f"127.0.0.1:{gateway.port}", ports=ports):
        traffic(gateway.url)
        time.sleep(4)  # healthy traffic: scraped, evaluated, and nothing may fire
        assert robot.messages == [], [m["title"] for _, m in robot.messages]
        fault_at = time.monotonic()
        sim.faults("500=1")
        fired_at, firing = robot.wait_for(f"[FIRING:1] {ALERT} gpt-4o", timeout=30)
        sim.faults("")
        healed_at = time.monotonic()
        resolved_at, resolved = robot.wait_for(f"[RESOLVED] {ALERT} gpt-4o", timeout=30)
    assert robot.bad == []
    assert fired_at > fault_at and resolved_at > healed_at
    assert "**WARNING** gpt-4o via openai: 100% of calls got a 5xx from the upstream" in firing["text"]
    assert "provider: openai" in firing["text"]
    assert "**RESOLVED** gpt-4o via openai" in resolved["text"]
    assert gateway.sample("tokenbooth_requests_total", outcome="error", error_type="server_error") > 0
