"""What slow, large or numerous client connections cannot do to the gateway (issue 17, ``limits.*``)."""

from __future__ import annotations

import contextlib
import logging
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayHandle, SimHandle
from tests.gateway.test_hardening import _raw
from tokenbooth.config import load_settings
from tokenbooth.errors import ConfigError
from tokenbooth.gateway.connections import PROBE_RESERVE, default_max_connections

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@pytest.fixture(scope="module", autouse=True)
def _open_files() -> Iterator[None]:
    """Room for a thousand client sockets and the gateway's ends of them in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"these tests need {wanted} open files; the hard limit is {hard} (raise it: ulimit -Hn {wanted})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _sim_upstream(sim: SimHandle) -> list[dict[str, str]]:
    return [{"name": "sim", "base_url": sim.url}]


def _answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head, head
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


def _wait_for_connections(gw: GatewayHandle, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(gw.server.server_state.connections) != count:
        assert time.monotonic() < deadline, f"{len(gw.server.server_state.connections)} connections, not {count}"
        time.sleep(0.01)


def test_a_thousand_slowloris_clients_are_cut_off_at_the_header_timeout_while_healthz_answers(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    timeout = 1.5
    gw = make_gateway(_sim_upstream(sim), limits={"header_timeout": timeout})
    opened = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(1000)]
    silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(5)]  # never send a byte
    selector = selectors.DefaultSelector()
    for sock in slow + silent:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    for sock in slow:
        sock.send(HEAD)
    answers = {sock: b"" for sock in slow + silent}
    closed_after: dict[socket.socket, float] = {}
    health: list[tuple[int, float]] = []
    next_drip = 0.0
    while len(closed_after) < len(answers) and time.monotonic() < opened + timeout + 5:
        if time.monotonic() >= next_drip:  # one more byte of a header name from each, four times a second
            for sock in slow:
                if sock not in closed_after:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")
            asked = time.monotonic()
            health.append((httpx.get(f"{gw.base}/healthz", timeout=5).status_code, time.monotonic() - asked))
            next_drip = time.monotonic() + 0.25
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            answers[sock] += data
            if not data:
                closed_after[sock] = time.monotonic() - opened
                selector.unregister(sock)
    selector.close()
    for sock in slow + silent:
        sock.close()

    assert len(closed_after) == len(answers), f"{len(answers) - len(closed_after)} connections still open"
    cut = sorted(closed_after[sock] for sock in slow)
    assert cut[0] >= timeout - 0.1 and cut[-1] < timeout + 2, (cut[0], cut[-1])
    for sock in slow:
        status, body = _answer(answers[sock])
        assert status == 408 and body["error"]["code"] == "request_timeout"
    assert all(answers[sock] == b"" for sock in silent)  # nothing asked, nothing answered
    assert len(health) >= 4 and {status for status, _ in health} == {200}
    assert max(took for _, took in health) < 1, health
    assert gw.sample("tokenbooth_rejected_requests_total", reason="timeout") == 1000  # the silent ones are not


def test_a_head_too_large_or_with_too_many_headers_is_answered_431_and_counted(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway(_sim_upstream(sim))  # the defaults: 64 KiB, 100 headers
    start = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"
    refused = {
        # 16 MB in one header, sent as it goes: refused once 64 KiB of it arrived, the rest never sent
        "16 MB header": _raw(gw.port, start + b"x-big: ", (b"a" * 65536 for _ in range(256))),
        # 20,000 headers
        "20,000 headers": _raw(gw.port, start, (b"".join(b"x-h%d: v\r\n" % i for i in range(k, k + 1000))
                                                for k in range(0, 20_000, 1000))),
        # a whole head of 70 KB in one write
        "70 KB head": _raw(gw.port, start + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n"),
        # 101 small headers
        "101 headers": _raw(gw.port, start + b"".join(b"x-h%d: v\r\n" % i for i in range(100)) + b"\r\n"),
    }
    for case, raw in refused.items():
        status, body = _answer(raw)
        assert status == 431, case
        assert body["error"] == {
            "message": "The request's headers are larger than this gateway accepts (65536 bytes, "
                       "limits.max_header_bytes; at most 100 headers, limits.max_headers).",
            "type": "invalid_request_error", "param": None, "code": "request_header_fields_too_large"}, case
    anthropic = _raw(gw.port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                     + b"".join(b"x-h%d: v\r\n" % i for i in range(100)) + b"\r\n{}")
    status, body = _answer(anthropic)
    assert status == 431 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert gw.sample("tokenbooth_rejected_requests_total", reason="headers_too_large") == 5

    # just inside both limits: served
    many = {f"x-h{i}": "v" * 600 for i in range(90)}  # ~55 KB in 95 headers with those httpx adds
    assert httpx.get(f"{gw.base}/healthz", headers=many).status_code == 200
    assert gw.sample("tokenbooth_rejected_requests_total", reason="headers_too_large") == 5


def test_past_max_connections_new_ones_are_refused_fast_and_the_probes_still_answer(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    gw = make_gateway(_sim_upstream(sim), limits={"max_connections": 20})
    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
    _wait_for_connections(gw, 20)
    with caplog.at_level(logging.WARNING, logger="tokenbooth.gateway"):
        asked = time.monotonic()
        chat = httpx.post(f"{gw.url}/chat/completions", json=CHAT)
        assert time.monotonic() - asked < 0.5
        assert chat.status_code == 503 and chat.headers["retry-after"] == "1"
        assert chat.json()["error"]["type"] == "server_error"
        assert chat.json()["error"]["code"] == "too_many_connections"
        messages = httpx.post(f"{gw.url}/messages", json={"model": "claude-sonnet-4", "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert messages.status_code == 503 and messages.json()["error"]["type"] == "overloaded_error"
        assert httpx.get(f"{gw.base}/healthz").status_code == 200  # on a connection of the reserve
        assert b"tokenbooth_rejected_requests_total" in httpx.get(f"{gw.base}/metrics").content

        # the reserve taken too: a new connection is closed as soon as it is accepted
        reserve = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(PROBE_RESERVE)]
        _wait_for_connections(gw, 20 + PROBE_RESERVE)
        asked = time.monotonic()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as late:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                late.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            try:
                said = late.recv(1024)
            except ConnectionResetError:
                said = b""
        assert said == b"" and time.monotonic() - asked < 0.5
    cap_messages = [r for r in caplog.records if "limits.max_connections=20" in r.getMessage()]
    assert len(cap_messages) == 1  # reached again and again, said once
    assert gw.sample("tokenbooth_rejected_requests_total", reason="connection_limit") == 3

    for sock in held + reserve:
        sock.close()
    _wait_for_connections(gw, 0)
    assert httpx.post(f"{gw.url}/chat/completions", json=CHAT).status_code == 200


def test_a_body_that_stops_is_cut_off_and_never_sent_upstream_while_a_slow_steady_one_is_served(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gw = make_gateway(_sim_upstream(sim), limits={"body_timeout": 1})
    body = orjson.dumps(CHAT)
    asked = time.monotonic()
    stalled = _raw(gw.port, HEAD + b"content-length: %d\r\n\r\n" % len(body) + body[:10])
    took = time.monotonic() - asked
    status, error = _answer(stalled)
    assert status == 408 and error["error"]["code"] == "request_timeout"
    assert 0.9 <= took < 2.5, took
    assert gw.sample("tokenbooth_rejected_requests_total", reason="timeout") == 1
    assert gw.sample("tokenbooth_rejected_requests_total", reason="invalid_request") == 0  # not read as a call
    assert sim.stats()["total"] == 0 and gw.rows() == []

    def steady() -> Iterator[bytes]:  # 2.4 s in all, never more than 0.6 s apart
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.6)
            yield body[i:i + len(body) // 4 + 1]

    served = _raw(gw.port, HEAD + b"content-length: %d\r\n\r\n" % len(body), steady())
    assert served.startswith(b"HTTP/1.1 200"), served[:200]

    # answered 413 by its Content-Length, a body that goes on trickling in is not read for ever
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(HEAD + b"content-length: 104857600\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        answered = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - answered < 5:
                sock.sendall(b"x")
                time.sleep(0.2)
        assert time.monotonic() - answered < 3


def test_a_long_stream_and_a_later_call_on_the_same_connection_outlive_both_timeouts(
        make_gateway: Callable[..., GatewayHandle], make_sim: Callable[..., SimHandle]) -> None:
    slow_sim = make_sim(ttft_ms=300, token_ms=250)
    gw = make_gateway(_sim_upstream(slow_sim), limits={"header_timeout": 1, "body_timeout": 1})
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        asked = time.monotonic()
        with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert time.monotonic() - asked > 2 and events[-1] == "data: [DONE]"
        connection = set(gw.server.server_state.connections)
        time.sleep(1.3)  # idle past header_timeout, within the keep-alive timeout
        assert client.post("/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200
        assert set(gw.server.server_state.connections) == connection  # the same connection served it
    assert gw.sample("tokenbooth_rejected_requests_total", reason="timeout") == 0


def test_the_default_connection_cap_leaves_half_the_file_descriptors_to_upstream_connections() -> None:
    assert default_max_connections(1024) == 480
    assert default_max_connections(20_000) == 9968
    assert default_max_connections(1 << 20) == 10_000
    assert default_max_connections(64) == 16


def test_connection_limits_are_validated_at_start() -> None:
    for key, value in (("header_timeout", 0), ("max_connections", 0), ("max_headers", 1), ("keep_alive_timeout", 0)):
        with pytest.raises(ConfigError, match=f"limits.{key}"):
            load_settings(overrides={"limits": {key: value}}, environ={})
