"""The upstream client: keep-alive, body framing, decoding, timeouts and failures, against
real servers on loopback (a scripted raw TCP server, and the simulated upstream over TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from tokenbooth.config import TimeoutConfig
from tokenbooth.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamInvalidResponse,
    UpstreamReadTimeout,
)
from tokenbooth.gateway.client import Pool
from tokenbooth.simulate import Simulator

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def _ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(h + b"\r\n" for h in extra), body)


def _run(handler: Handler, scenario: Callable[[Pool, list[bytes]], Awaitable[None]],
         timeout: TimeoutConfig | None = None) -> list[bytes]:
    """Serve ``handler`` on a free port, run ``scenario`` against a pool for it; returns the requests seen."""
    seen: list[bytes] = []

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}/v1", timeout or TimeoutConfig(), upstream="up")
        try:
            await scenario(pool, seen)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return seen


def test_calls_reuse_one_keep_alive_connection_and_send_what_was_asked() -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            request = await _read_request(reader)
            writer.write(_ok(b'{"n":%d}' % request.count(b"x"), b"x-request-id: up-1"))

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        for n in range(1, 6):
            resp = await pool.request(b"/chat/completions", b"x" * n, [(b"authorization", b"Bearer k")])
            assert (resp.status, await resp.read()) == (200, b'{"n":%d}' % n)
            assert resp.header(b"x-request-id") == "up-1" and resp.header(b"nope") is None
            resp.release()

    _run(handler, scenario)
    assert len(connections) == 1


def test_the_request_carries_the_base_path_host_length_and_headers() -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(_ok(b"{}"))

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/embeddings", b'{"a":1}', [(b"x-api-key", b"secret")])
        await resp.read()
        resp.release()

    _run(handler, scenario)
    head, body = requests[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/embeddings HTTP/1.1"
    assert b"content-length: 7" in lines and b"x-api-key: secret" in lines
    assert any(line.startswith(b"host: 127.0.0.1:") for line in lines)
    assert body == b'{"a":1}'


def test_chunked_gzip_and_close_delimited_bodies_are_decoded() -> None:
    payload = b'{"hello":"' + b"w" * 5000 + b'"}'
    packed = gzip.compress(payload)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-encoding: gzip\r\n\r\n")
        for i in range(0, len(packed), 100):
            part = packed[i:i + 100]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: 1\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/x", b"", [])
        assert await resp.read() == payload
        resp.release()
        resp = await pool.request(b"/x", b"", [])
        chunks = [chunk async for chunk in resp]
        assert chunks == [b"data: 1\n\n", b"data: [DONE]\n\n"], "each chunk as it arrived, then the end"
        resp.release()

    _run(handler, scenario)


@pytest.mark.parametrize("pause", [0.0, 0.02])  # reused before or after the hang-up is seen
def test_an_idle_connection_the_upstream_closed_is_replaced_without_losing_the_call(pause: float) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(_ok(b"{}"))
        await writer.drain()
        # then hang up after the answer, as a server whose keep-alive timeout ran out

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        for _ in range(3):
            resp = await pool.request(b"/x", b"", [])
            assert resp.status == 200
            await resp.read()
            resp.release()
            await asyncio.sleep(pause)

    _run(handler, scenario)
    assert served == 3


def test_bytes_after_a_complete_answer_retire_the_connection() -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            await _read_request(reader)
            writer.write(_ok(b"{}") + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # one answer too many

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        for _ in range(2):
            resp = await pool.request(b"/x", b"", [])
            assert await resp.read() == b"{}"
            resp.release()
            assert resp._conn.closed, "retired, not leaked"
        assert not pool.idle

    _run(handler, scenario)
    assert len(connections) == 2


def test_a_large_body_read_whole_does_not_stall_on_back_pressure() -> None:
    big = b"x" * (3 * 1024 * 1024)  # far past the 256 KB at which a streamed body pauses reading

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_ok(big))
        await writer.drain()
        await reader.read()

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/x", b"", [])
        assert await resp.read() == big
        resp.release()

    _run(handler, scenario, TimeoutConfig(connect=1, read=2, total=5))


_HALF_GZIP = gzip.compress(b'{"hello":"' + b"w" * 5000 + b'"}')[:40]


@pytest.mark.parametrize(("answer", "then", "error", "match"), [
    (b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial', "close", UpstreamConnectError, "broke off"),
    # no length, no chunks: the body ends with the connection, but a reset is not an orderly end
    (b'HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{"partial": ', "reset", UpstreamConnectError, "broke off"),
    (_ok(_HALF_GZIP, b"content-encoding: gzip"), "hold", UpstreamInvalidResponse, "ends too soon"),
])
def test_a_broken_body_is_an_error_not_an_answer(answer: bytes, then: str, error: type[Exception],
                                                 match: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        if then == "reset":
            await asyncio.sleep(0.05)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif then == "hold":
            await reader.read()

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/x", b"", [])
        with pytest.raises(error, match=match):
            await resp.read()
        resp.release()

    _run(handler, scenario)


def test_a_new_connection_the_upstream_closed_at_once_fails_fast() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # an overloaded upstream: accept, then hang up before the request

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        conn = await pool._connect()
        await asyncio.sleep(0.1)  # the hang-up is seen before the request goes out
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamConnectError, match="closed the connection"):
            await pool._send(conn, b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", b"",
                             started + 60)
        assert asyncio.get_running_loop().time() - started < 1, "not after the read timeout"

    _run(handler, scenario, TimeoutConfig(connect=1, read=30, total=60))


def test_garbage_is_an_invalid_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        with pytest.raises(UpstreamInvalidResponse, match="malformed"):
            await pool.request(b"/x", b"", [])

    _run(handler, scenario)


def test_silence_between_bytes_is_a_read_timeout_and_a_slow_steady_stream_is_not() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, never 0.3 s quiet
            await asyncio.sleep(0.1)
            writer.write(b"2\r\nok\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await _read_request(reader)
        await asyncio.sleep(2)  # says nothing at all

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/x", b"", [])
        assert await resp.read() == b"ok" * 6
        resp.release()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamReadTimeout, match=r"did not answer in time \(silent for 0.3 s\)"):
            await pool.request(b"/x", b"", [])
        assert 0.25 <= loop.time() - started < 1.5

    _run(handler, scenario, TimeoutConfig(connect=1, read=0.3, total=60))


def test_the_total_timeout_bounds_a_stream_that_never_stops() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            await asyncio.sleep(0.05)
            writer.write(b"2\r\nok\r\n")
            await writer.drain()

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        resp = await pool.request(b"/x", b"", [])
        with pytest.raises(UpstreamReadTimeout, match=r"did not answer in time \(over the 0.5 s total\)"):
            async for _ in resp:
                pass
        resp.release()

    _run(handler, scenario, TimeoutConfig(connect=1, read=0.3, total=0.5))


def test_a_refused_connection_and_a_full_backlog_are_connect_errors() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamConnectError, match="unreachable"):
            await Pool(f"http://127.0.0.1:{port}", TimeoutConfig(), upstream="up").request(b"/x", b"", [])

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: once the backlog is full, handshakes go unanswered
        fillers = []
        try:
            pool = Pool(f"http://127.0.0.1:{listener.getsockname()[1]}", TimeoutConfig(connect=0.3), upstream="up")
            with pytest.raises(UpstreamConnectTimeout):
                for _ in range(8):
                    sock = socket.socket()
                    sock.setblocking(False)
                    fillers.append(sock)
                    await pool._connect()
        finally:
            for sock in fillers:
                sock.close()
            listener.close()

    asyncio.run(main())


def test_a_cancelled_request_does_not_return_its_connection_to_the_pool() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(_ok(b'{"late":true}'))
        await writer.drain()
        await reader.read()

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        task = asyncio.ensure_future(pool.request(b"/x", b"", []))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not pool.idle

    _run(handler, scenario)


@contextlib.asynccontextmanager
async def _tls_simulator() -> AsyncIterator[tuple[str, trustme.CA]]:
    """The simulated upstream over TLS with a certificate from a fresh test CA: (base URL, CA)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    runner = web.AppRunner(Simulator().app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=server_ctx).start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/v1", ca
    finally:
        await runner.cleanup()


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_tls_upstreams_are_verified_and_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with _tls_simulator() as (url, ca):
            trusting = _trusting(ca)
            pool = Pool(url, TimeoutConfig(), upstream="tls", ssl_context=trusting)
            resp = await pool.request(b"/chat/completions", b'{"model":"gpt-4o-mini","messages":[]}',
                                      [(b"content-type", b"application/json")])
            assert resp.status == 200 and b"chat.completion" in await resp.read()
            resp.release()
            pool.close()
            # the system's trust store does not know this CA: the handshake fails, named as such
            with pytest.raises(UpstreamConnectError, match="TLS"):
                await Pool(url, TimeoutConfig(), upstream="tls").request(b"/models", b"", [], method=b"GET")
            # SSL_CERT_FILE names a CA bundle for the default context, as the README says
            bundle = tmp_path / "ca.pem"
            ca.cert_pem.write_to_path(str(bundle))
            monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
            pool = Pool(url, TimeoutConfig(), upstream="tls")
            resp = await pool.request(b"/models", b"", [], method=b"GET")
            assert resp.status == 200 and b"gpt-4o-mini" in await resp.read()
            resp.release()
            pool.close()

    asyncio.run(main())


class _Proxy:
    """A small HTTP proxy on loopback: CONNECT tunnels, and plain requests it answers itself.
    It keeps every request head it saw."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
            if b"proxy-authorization: Basic dXNlcjpwIHc=" not in head:  # user:"p w"
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                return
            if method != b"CONNECT":
                writer.write(_ok(b'{"via":"proxy"}'))
                await writer.drain()
                return
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        finally:
            writer.close()


def test_plain_http_goes_through_a_proxy_with_the_absolute_url_and_credentials() -> None:
    async def main() -> None:
        async with _Proxy() as proxy:
            pool = Pool("http://upstream.example:8000/v1", TimeoutConfig(), upstream="up",
                        proxy=f"http://user:p%20w@127.0.0.1:{proxy.port}")
            resp = await pool.request(b"/chat/completions", b"{}", [])
            assert await resp.read() == b'{"via":"proxy"}'
            resp.release()
            pool.close()
            assert proxy.heads[0].startswith(b"POST http://upstream.example:8000/v1/chat/completions HTTP/1.1\r\n")
            assert b"host: upstream.example:8000\r\n" in proxy.heads[0]

    asyncio.run(main())


def test_https_goes_through_a_connect_tunnel_and_a_refusal_is_named() -> None:
    async def main() -> None:
        async with _tls_simulator() as (url, ca):
            trusting = _trusting(ca)
            port = int(url.split(":")[2].split("/")[0])
            async with _Proxy() as proxy:
                pool = Pool(url, TimeoutConfig(), upstream="tls", ssl_context=trusting,
                            proxy=f"http://user:p%20w@127.0.0.1:{proxy.port}")
                for _ in range(2):  # the second call reuses the tunnel
                    resp = await pool.request(b"/chat/completions", b'{"model":"gpt-4o-mini","messages":[]}', [])
                    assert resp.status == 200 and b"chat.completion" in await resp.read()
                    resp.release()
                pool.close()
                assert len(proxy.heads) == 1
                assert proxy.heads[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n" % port)
                wrong = Pool(url, TimeoutConfig(), upstream="tls", ssl_context=trusting,
                             proxy=f"http://user:wrong@127.0.0.1:{proxy.port}")
                with pytest.raises(UpstreamConnectError, match=r"through its proxy: .* refused the tunnel .* 407") \
                        as refused:
                    await wrong.request(b"/models", b"", [], method=b"GET")
                assert "wrong" not in str(refused.value), "proxy credentials never appear in errors"

    asyncio.run(main())


def test_the_environment_names_the_proxy_unless_no_proxy_or_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenbooth.config import UpstreamConfig, load_settings
    from tokenbooth.errors import ConfigError

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    remote = UpstreamConfig(name="a", base_url="https://api.openai.com/v1")
    assert remote.proxy_url() is None
    monkeypatch.setenv("HTTPS_PROXY", "http://egress:3128")
    assert remote.proxy_url() == "http://egress:3128"
    assert UpstreamConfig(name="b", base_url="http://127.0.0.1:9000/v1").proxy_url() is None
    assert UpstreamConfig(name="c", base_url="https://api.openai.com/v1", proxy="direct").proxy_url() is None
    assert UpstreamConfig(name="d", base_url="https://x.example/v1", proxy="http://other:8080").proxy_url() == \
        "http://other:8080"
    monkeypatch.setenv("NO_PROXY", "openai.com")
    assert remote.proxy_url() is None
    with pytest.raises(ValueError, match="direct"):
        UpstreamConfig(name="e", base_url="https://x.example/v1", proxy="socks5://p:1080")
    # a malformed URL (a '/' in the password) is refused, and the message masks the password
    for bad in ("http://u:s3/cret@p:1080", "http://u:s3cret@p:99999"):
        with pytest.raises(ConfigError, match="%-quoted") as refused:
            load_settings(overrides={"upstreams": [{"name": "f", "base_url": "https://x.example/v1", "proxy": bad}]},
                          environ={})
        assert "s3" not in refused.value.message and "u:***@p:" in refused.value.message
    monkeypatch.setenv("HTTPS_PROXY", "http://u:s3/cret@p:1080")
    with pytest.raises(ConfigError, match=r"environment's proxy 'http://u:\*\*\*@p:1080' is not usable"):
        UpstreamConfig(name="g", base_url="https://api.example/v1").proxy_url()


def test_connections_idle_for_the_keepalive_are_closed_and_the_one_in_use_is_kept() -> None:
    open_now = 0  # connections the server holds open

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        try:
            while True:
                await _read_request(reader)
                await asyncio.sleep(0.05)  # a burst of calls needs a connection each
                writer.write(_ok(b"{}"))
        finally:
            open_now -= 1

    async def scenario(pool: Pool, seen: list[bytes]) -> None:
        async def call() -> None:
            resp = await pool.request(b"/x", b"", [])
            await resp.read()
            resp.release()

        await asyncio.gather(*(call() for _ in range(20)))
        assert (len(pool.idle), open_now) == (20, 20)
        for _ in range(8):  # then one call at a time for over a second: one connection does
            await call()
            await asyncio.sleep(0.1)
        assert (len(pool.idle), open_now) == (1, 1)

    _run(handler, scenario, TimeoutConfig(keepalive=0.3))
