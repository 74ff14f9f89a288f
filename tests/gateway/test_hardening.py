"""What hostile or broken upstreams and clients cannot do to the gateway (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _raw(port: int, head: bytes, chunks: Iterator[bytes] | None = None) -> bytes:
    """Send a request's head, then body chunks until the gateway answers; return what it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        sock.setblocking(False)
        for chunk in chunks or ():
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_a_body_past_the_limit_is_refused_with_413_before_it_fills_memory(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url}], limits={"max_request_bytes": 1 << 20})
    before = _rss_mb()
    declared = _raw(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: 104857600\r\n\r\n")  # 100 MB announced, not one byte sent
    assert declared.startswith(b"HTTP/1.1 413")
    chunk = b"x" * 65536
    streamed = _raw(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"transfer-encoding: chunked\r\n\r\n",
                    (b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(1600)))  # up to 100 MB, chunked
    assert streamed.startswith(b"HTTP/1.1 413")
    assert _rss_mb() - before < 10
    r = httpx.post(f"{gw.url}/chat/completions", content=b"{" + b" " * (2 << 20) + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "limits.max_request_bytes" in r.json()["error"]["message"]
    webhook = httpx.post(f"{gw.base}/alertmanager/webhook/slack", content=b"x" * (2 << 20))
    assert webhook.status_code == 413
    assert gw.sample("tokenbooth_rejected_requests_total", reason="too_large") == 4
    assert sim.stats()["total"] == 0


def test_an_upload_past_its_limit_is_refused_and_a_long_model_name_is_a_400(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway([{"name": "sim", "base_url": sim.url}], limits={"max_upload_bytes": 1 << 20})
    r = httpx.post(f"{gw.url}/files", files={"file": ("a.jsonl", b"x" * (2 << 20))}, data={"purpose": "batch"})
    assert r.status_code == 413 and "upload" in r.json()["error"]["message"]


    def multipart() -> Iterator[bytes]:  # 4 MB with no Content-Length (chunked): counted as it streams
        yield (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
               b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
        for _ in range(64):
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    r = httpx.post(f"{gw.url}/files", content=multipart(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    r = httpx.post(f"{gw.url}/chat/completions", json={**CHAT, "model": "m" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "limits.max_model_length" in r.json()["error"]["message"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_encoded_line_break_in_a_passed_through_path_cannot_split_the_upstream_request(
        gateway: GatewayHandle, sim: SimHandle) -> None:
    smuggled = ("/v1/files/x%20HTTP/1.1%0D%0Ahost%3A%20a%0D%0Acontent-length%3A%200%0D%0A%0D%0A"
                "POST%20/v1/chat/completions%20HTTP/1.1%0D%0Ahost%3A%20a%0D%0A%0D%0A")
    r = httpx.get(f"{gateway.base}{smuggled}")
    assert r.status_code == 404  # the upstream saw one request for an odd file name: no such file
    assert sim.stats()["requests"].get("/v1/chat/completions", 0) == 0
    assert [row.operation for row in gateway.rows()] == ["files"]


def _established(port: int) -> int:
    """TCP connections established to ``port`` on IPv4 loopback, as the kernel counts them."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count


def test_a_burst_of_upstream_connections_is_closed_once_idle_for_the_keepalive(
        make_gateway: Callable[..., GatewayHandle], make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(ttft_ms=300)  # every call of the burst holds its own connection
    gw = make_gateway([{"name": "sim", "base_url": sim.url, "timeout": {"keepalive": 1.0}}])

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
            calls = [client.post(f"{gw.url}/chat/completions", json=CHAT) for _ in range(40)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 40
    assert _established(sim.port) > 20  # one per call in flight (most of the 40), kept for the next calls
    t0 = time.monotonic()
    while _established(sim.port) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert _established(sim.port) == 0, "idle connections outlived the keep-alive timeout"
    assert time.monotonic() - t0 > 0.5  # kept until then
