"""The gateway's HTTP/1.1 client to its upstreams: keep-alive pools on asyncio protocols.

The proxy path spends most of its time talking to upstreams, and a general-purpose client
(aiohttp's ``ClientSession``) cost about 0.15 ms of CPU per call there: URL objects, header
multidicts, tracing hooks, payload registries. This client does only what the proxy needs,
with httptools (the parser uvicorn uses) on a plain ``asyncio.Protocol``:

- one :class:`Pool` per upstream origin keeps idle keep-alive connections, plain or TLS, and
  closes each one that has been idle for the upstream's ``timeout.keepalive``;
- a request is written in one ``transport.write``; the response arrives as an
  :class:`UpstreamResponse` whose body is read whole (``await read()``) or chunk by chunk as
  it arrives (``async for``), chunked transfer and gzip/deflate decoded;
- timeouts are the upstream's ``connect``, ``read`` (the longest silence between bytes) and
  ``total``, checked by one timer per request that is re-armed only when it fires;
- failures raise tokenbooth's upstream errors directly (connect, connect timeout, read
  timeout, invalid response), so nothing third-party leaks out of this module.

A request is never sent twice here. An idle connection is reused only if nothing has arrived on
it, an end of file included (the socket is polled first), so one the upstream has closed is
dropped before a byte of the request goes out. A request that fails once written raises, even
with no byte of an answer back: the upstream may have read it, and may bill it, so sending it
again is a retry, which the proxy decides, counts and records (``attempts``).

>>> pool = Pool("https://api.openai.com", TimeoutConfig(), upstream="openai")  # doctest: +SKIP
>>> resp = await pool.request(b"/v1/chat/completions", body, [(b"authorization", b"Bearer ...")])
>>> data = await resp.read(); resp.release()   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import select
import ssl
import zlib
from collections.abc import AsyncIterator, Iterable
from urllib.parse import unquote, urlsplit

import httptools

from tokenbooth.config import TimeoutConfig
from tokenbooth.errors import (
    InvalidRequest,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamReadTimeout,
)

__all__ = ["Pool", "UpstreamResponse", "safe_target"]

_HIGH_WATER = 256 * 1024  # unread body bytes at which reading from the upstream pauses
_DECODERS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


_SAFE_TARGET = re.compile(rb"^/[\x21-\x7e]*$")  # printable ASCII, no space: nothing that ends a request line


def safe_target(target: bytes) -> bool:
    """Whether a request target (path and query) can go in a request line as it is."""
    return _SAFE_TARGET.match(target) is not None

_BODILESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})


class UpstreamResponse:
    """One upstream answer: status and headers at once, the body as it arrives.

    Header names are lower-case bytes. Call :meth:`release` when done (it returns the
    connection to the pool if the body was read to the end) or :meth:`close` to hang up.
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_decoder", "_done", "_error", "_waiter", "_whole", "headers",
                 "status")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._done = False
        self._whole = False
        self._decoder: zlib._Decompress | None = None
        encoding = self.header(b"content-encoding")
        if encoding is not None and (wbits := _DECODERS.get(encoding.strip().lower().encode())):
            self._decoder = zlib.decompressobj(wbits)

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True  # it is all buffered anyway: reading never pauses for it
        self._conn.resume()
        while not self._done and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        return self._take()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                data = self._take()
                self._conn.resume()
                yield data
            elif self._error is not None:
                raise self._error
            elif self._done:
                return
            else:
                await self._wait()

    def _take(self) -> bytes:
        """Everything buffered so far, and the buffer emptied."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # Called by the connection.
    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self._fail(UpstreamInvalidResponse(
                    f"upstream '{self._conn.pool.upstream}' sent a body that does not decompress",
                    self._conn.pool.upstream))
                return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > _HIGH_WATER and not self._whole:
                self._conn.pause()
            self._wake()

    def _finish(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)
            if not self._decoder.eof:
                self._fail(UpstreamInvalidResponse(
                    f"upstream '{self._conn.pool.upstream}' sent a compressed body that ends too soon",
                    self._conn.pool.upstream))
                return
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = error
            self._wake()

    def release(self) -> None:
        """Give the connection back for reuse if the answer was complete, else close it."""
        self._conn.release(self)

    def close(self) -> None:
        """Hang up on the upstream at once (a client went away mid-stream)."""
        self._conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.last_data = 0.0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.complete = False
        self.keep_alive = False
        self.paused = False
        self.drained: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        self.partial = False  # the request body was not sent whole: the connection cannot be reused
        self.poller: select.poll | None = None  # reports the socket readable: data or end of file

    # asyncio.Protocol
    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    async def drain(self) -> None:
        """Wait while the upstream reads the body more slowly than the client sends it."""
        while self.drained is not None and not self.closed:
            await self.drained
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport: create_connection
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def reusable(self) -> bool:
        """Whether an idle connection may carry a request: open, and nothing arrived on it since its
        last answer. What arrives on an idle connection is an end of file (the upstream closed it,
        perhaps a moment ago, before the event loop has seen it) or bytes nobody asked for."""
        return not self.closed and not (self.poller is not None and self.poller.poll(0))

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        if self.complete or (self.head is None and self.response is None):
            self.abort()  # bytes after the answer, or nobody asked: the connection cannot be trusted
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamInvalidResponse(f"upstream '{self.pool.upstream}' tried to upgrade the connection",
                                                 self.pool.upstream))
        except httptools.HttpParserError:  # a callback's exception arrives wrapped in one too
            self._broken(UpstreamInvalidResponse(f"upstream '{self.pool.upstream}' sent a malformed HTTP response",
                                                 self.pool.upstream))

    def connection_lost(self, exc: Exception | None) -> None:
        aborted = self.closed  # we hung up ourselves: whatever was cut off is not an answer
        self.closed = True
        self._cancel_timer()
        if self.response is not None and not self.complete and exc is None and not aborted \
                and self._ends_at_eof():
            self.complete = True  # a body with neither length nor chunks ends with the connection
            self.response._finish()
        if not self.complete:
            stage = "broke off its response" if self.response is not None else "closed the connection"
            self._broken(UpstreamConnectError(f"upstream '{self.pool.upstream}' {stage}", self.pool.upstream),
                         abort=False)

    def _ends_at_eof(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: stop parsing, retire the connection
            raise ValueError("unsolicited response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            return
        self.response = UpstreamResponse(self, status, self.headers)
        if self.head is not None and not self.head.done():
            self.head.set_result(self.response)
        self.head = None

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is None:
            return  # the end of an interim answer
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside the callback
        self._cancel_timer()
        self.response._finish()

    # requests
    def send(self, head: bytes, body: bytes, deadline: float) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        if self.closed:  # the upstream hung up (or spoke unasked) before the request went out
            raise UpstreamConnectError(f"upstream '{self.pool.upstream}' closed the connection", self.pool.upstream)
        self.headers = []
        self.response = None
        self.complete = self.keep_alive = False
        self.partial = False
        self.head = self.loop.create_future()
        self.last_data = self.loop.time()
        self.deadline = deadline
        self._arm(min(deadline, self.last_data + self.pool.timeout.read))
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.head

    def release(self, response: UpstreamResponse) -> None:
        if response is not self.response:
            return
        self.response = None
        self.head = None
        self._cancel_timer()
        if self.complete and self.keep_alive and not self.closed and not self.partial:
            self.resume()
            self.pool.park(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # timeouts: one timer, re-armed from the last byte only when it fires
    def _arm(self, when: float) -> None:
        self.timer = self.loop.call_at(when, self._check)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        if self.complete:
            return
        now = self.loop.time()
        if self.paused:  # the reader is slow, not the upstream: wait for it
            self.last_data = now
        quiet_until = self.last_data + self.pool.timeout.read
        if now < quiet_until and now < self.deadline:
            self._arm(min(quiet_until, self.deadline))
            return
        timeout = self.pool.timeout
        why = f"over the {timeout.total:g} s total" if now >= self.deadline else f"silent for {timeout.read:g} s"
        self._broken(UpstreamReadTimeout(f"upstream '{self.pool.upstream}' did not answer in time ({why})",
                                         self.pool.upstream))

    def _broken(self, error: UpstreamError, *, abort: bool = True) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)
        if abort:
            self.abort()


class _Tunnel(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT; the connection then carries TLS to the upstream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reply: asyncio.Future[int] = loop.create_future()
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and not self.reply.done():
            try:
                self.reply.set_result(int(self.buffer.split(b" ", 2)[1]))
            except (IndexError, ValueError):
                self.reply.set_exception(ConnectionError("the proxy sent a malformed answer to CONNECT"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectionError("the proxy closed the connection"))


class Pool:
    """Keep-alive connections to one upstream origin (scheme, host, port)."""

    def __init__(self, base_url: str, timeout: TimeoutConfig, *, upstream: str,
                 ssl_context: ssl.SSLContext | None = None, proxy: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.upstream = upstream
        self.timeout = timeout
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.authority = f"{host}:{self.port}".encode("idna")  # what CONNECT asks a proxy for
        self.prefix = parts.path.rstrip("/").encode()
        self.ssl_context = ssl_context if ssl_context is not None else \
            (ssl.create_default_context() if self.tls else None)
        self.proxy: tuple[str, int] | None = None
        self.proxy_auth = b""  # the Proxy-Authorization header line, if the proxy URL has credentials
        if proxy is not None:
            try:
                p = urlsplit(proxy)
                proxy_host, proxy_port, user, password = p.hostname, p.port or 80, p.username, p.password
            except ValueError:  # the message would quote the URL's parts, credentials included
                raise ValueError("the proxy URL is malformed (quote '/', '?', '#' and '@' in credentials)") from None
            if p.scheme != "http" or not proxy_host:
                raise ValueError("the proxy must be an http:// URL")
            self.proxy = (proxy_host, proxy_port)
            if user is not None:
                token = base64.b64encode(f"{unquote(user)}:{unquote(password or '')}".encode()).decode()
                self.proxy_auth = f"proxy-authorization: Basic {token}\r\n".encode()
            if not self.tls:  # plain HTTP through a proxy: the absolute URL in the request line
                self.prefix = b"http://" + self.host_header + self.prefix
        self.idle: collections.deque[_Connection] = collections.deque()  # longest idle first
        self._reaper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, path: bytes, body: bytes, headers: Iterable[tuple[bytes, bytes]], *,
                      method: bytes = b"POST", stream: AsyncIterator[bytes] | None = None,
                      length: int | None = None) -> UpstreamResponse:
        """Send one request; returns once the status line and headers arrived.

        ``path`` is appended to the base URL's path. The body is ``body``, or with ``stream`` the
        chunks it yields, sent as they come (``length`` bytes in all, or chunked when it is None),
        so an upload is never held whole. Raises an :class:`UpstreamError`.
        """
        if not safe_target(path):  # a second defence: no byte that ends or splits a request line
            raise InvalidRequest("The request path or query has characters a URL may not hold.")
        if stream is None:
            framing = b"content-length: %d\r\n" % len(body) if body or method not in _BODILESS else b""
        else:
            framing = b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n"
        head = b"".join([
            method, b" ", self.prefix, path, b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n",
            b"" if self.tls else self.proxy_auth, framing, b"accept-encoding: gzip, deflate\r\n",
            *[b"%s: %s\r\n" % pair for pair in headers], b"\r\n",
        ])
        deadline = self.loop.time() + self.timeout.total
        conn = self._idle() or await self._connect()
        return await self._send(conn, head, body, deadline, stream, length is None)

    @staticmethod
    async def _send(conn: _Connection, head: bytes, body: bytes, deadline: float,
                    stream: AsyncIterator[bytes] | None = None, chunked: bool = False) -> UpstreamResponse:
        try:
            answer = conn.send(head, body, deadline)
            if stream is not None:
                conn.partial = True  # until the last chunk is out
                assert conn.transport is not None
                async for chunk in stream:
                    if chunk:
                        conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                        await conn.drain()
                    if answer.done():  # the upstream answered before the body's end (a 413, say)
                        return await answer
                if chunked:
                    conn.transport.write(b"0\r\n\r\n")
                conn.partial = False
            return await answer
        except BaseException:
            conn.abort()  # failed or cancelled half-way: the connection's state is unknown
            raise

    def _idle(self) -> _Connection | None:
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the most likely to be alive
            if now - conn.idle_since < self.timeout.keepalive and conn.reusable():
                return conn
            conn.abort()
        return None

    def park(self, conn: _Connection) -> None:
        """Keep a connection whose answer is complete for the next request, for ``keepalive`` seconds."""
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._reaper is None:
            self._reaper = self.loop.call_at(conn.idle_since + self.timeout.keepalive, self._reap)

    def _reap(self) -> None:
        """Close the connections idle for ``keepalive`` seconds (after a burst, most of them: reuse
        takes the most recent first), then wait for the next one to be."""
        self._reaper = None
        keepalive = self.timeout.keepalive
        expired = self.loop.time() - keepalive + 0.001  # a timer may fire a clock tick early
        idle = self.idle
        while idle and idle[0].idle_since <= expired:
            idle.popleft().abort()
        if idle:
            self._reaper = self.loop.call_at(idle[0].idle_since + keepalive, self._reap)

    async def _connect(self) -> _Connection:
        try:
            return await asyncio.wait_for(self._open(), self.timeout.connect)
        except TimeoutError:
            raise UpstreamConnectTimeout(f"upstream '{self.upstream}' did not accept a connection in time",
                                         self.upstream) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(f"upstream '{self.upstream}' failed the TLS handshake: {exc.reason or exc}",
                                       self.upstream) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            via = " through its proxy" if self.proxy else ""
            raise UpstreamConnectError(f"upstream '{self.upstream}' is unreachable{via}: {reason}",
                                       self.upstream) from None

    async def _open(self) -> _Connection:
        if self.proxy is None:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.host if self.tls else None)
            return conn
        if not self.tls:
            _, conn = await self.loop.create_connection(lambda: _Connection(self), *self.proxy)
            return conn
        # HTTPS through a proxy: a CONNECT tunnel, then TLS with the upstream inside it
        transport, tunnel = await self.loop.create_connection(lambda: _Tunnel(self.loop), *self.proxy)
        try:
            transport.write(b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (
                self.authority, self.authority, self.proxy_auth))
            status = await tunnel.reply
            if not 200 <= status < 300:
                raise ConnectionError(f"the proxy refused the tunnel with status {status}")
            conn = _Connection(self)
            tls = await self.loop.start_tls(transport, conn, self.ssl_context,  # type: ignore[arg-type]
                                            server_hostname=self.host)
        except BaseException:
            transport.abort()
            raise
        assert tls is not None
        conn.connection_made(tls)
        return conn

    def close(self) -> None:
        """Close every idle connection."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self.idle:
            self.idle.pop().abort()

