"""Connection-level limits: how long a client may take to send a request, how large its head may be,
and how many connections one gateway process keeps open.

:class:`GatewayProtocol` is uvicorn's httptools protocol with these limits (``limits.*``):

- A request's head (request line and headers) must arrive within ``header_timeout`` of its connection
  opening, or of its first byte on a kept-alive connection: else 408 and the connection is closed. A
  connection that sent nothing is closed without an answer, and not counted.
- A request's body may fall silent for at most ``body_timeout`` (while the gateway is not reading, the
  client is not late): else 408 and close. A body still arriving after its request was answered (a 413
  by its Content-Length, say) is not read for ever: the connection is closed a timer period later.
- A head past ``max_header_bytes`` or ``max_headers`` is answered 431 and closed: while it still arrives
  when its size alone tells, else as soon as it is whole, before the gateway sees it.
- Past ``max_connections`` open connections, :data:`PROBE_RESERVE` more are taken, for one request each to
  one of :data:`PROBE_PATHS`; anything else they ask is a 503. Past those, a new connection is closed as
  soon as it is accepted. The cap keeps the process below its file-descriptor limit, so that it can
  always accept, answer its probes and log; reaching it is logged at most once a minute.

Refusals are answered in OpenAI's error format (Anthropic's on ``/v1/messages``) and counted in
``tokenbooth_rejected_requests_total`` as ``headers_too_large``, ``timeout`` or ``connection_limit``.

Each connection has one timer, armed when it opens and re-armed by itself when it fires: a request arms
none, so the normal path pays a clock read per read from the socket and a few attribute writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import Counter
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from tokenbooth.config import RequestLimitsConfig
from tokenbooth.errors import HeadersTooLarge, RequestTimeout, TokenboothError, TooManyConnections

__all__ = ["PROBE_PATHS", "PROBE_RESERVE", "ConnectionLimits", "GatewayProtocol", "default_max_connections"]

log = logging.getLogger("tokenbooth.gateway")

PROBE_PATHS = frozenset({b"/healthz", b"/metrics"})
PROBE_RESERVE = 32  # connections past max_connections, for the probes
CAP_LOG_INTERVAL = 60.0  # seconds between two messages saying the cap is reached

# What a connection waits for; its timer checks the deadline that goes with it.
_HEAD, _BODY, _APP = range(3)  # a head (none yet when no byte came), a body, nothing (the app has the request)

_ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def default_max_connections(open_files: int | None = None) -> int:
    """Half of ``open_files`` (the process's RLIMIT_NOFILE) less 64 for its own files, at most 10,000:
    every client connection may hold an upstream connection as well.

    >>> default_max_connections(1024), default_max_connections(1 << 20)
    (480, 10000)
    """
    if open_files is None:
        try:
            import resource
        except ImportError:  # Windows: no RLIMIT_NOFILE
            return 10_000
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if open_files == resource.RLIM_INFINITY:
            return 10_000
    return max(16, min(10_000, (open_files - 64) // 2))


class ConnectionLimits:
    """What every connection of one gateway process shares: the limits, the refusal counter, and when
    reaching the cap was last logged. The gateway holds one (``Gateway.connection_limits``)."""

    def __init__(self, limits: RequestLimitsConfig, rejected: Counter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = limits.max_connections or default_max_connections()
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        # the longest a connection's timer sleeps: a head or a body beginning now is due no sooner
        self.check_interval = min(limits.header_timeout, limits.body_timeout)
        self._rejected = rejected
        self._clock = clock
        self._logged_at: float | None = None
        self._closed_since_log = 0

    def refused(self, exc: TokenboothError) -> None:
        """Count a refusal in ``tokenbooth_rejected_requests_total``."""
        self._rejected.labels(exc.reject_reason).inc()

    def cap_reached(self, open_now: int, closed: bool) -> None:
        """A connection arrived with ``open_now`` open: log it, at most once a minute; ``closed``: it
        was closed at once."""
        self._closed_since_log += closed
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < CAP_LOG_INTERVAL:
            return
        self._logged_at = now
        log.warning("%d connections are open, the most this process keeps (limits.max_connections=%d): %d more "
                    "may ask only for /healthz and /metrics, further ones are closed as they are accepted "
                    "(%d since the last message). If this is load, raise `ulimit -n` or limits.max_connections; "
                    "said at most once a minute.", open_now, self.max_connections, PROBE_RESERVE,
                    self._closed_since_log)
        self._closed_since_log = 0


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under the gateway's connection limits (``Gateway.connection_limits``).

    >>> uvicorn.Config(gateway, http=GatewayProtocol)  # doctest: +SKIP
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = config.loaded_app.connection_limits
        self.url = b""
        self._phase = _HEAD
        self._since = 0.0  # when the head waited for became due
        self._last_read = 0.0
        self._head_bytes = 0  # bytes read while a head was waited for (a body's first bytes may be among them)
        self._probe_only = False
        self._draining = False  # a body still arrives after its request was answered
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.limits
        open_now = len(self.connections)
        if open_now >= limits.max_connections:
            full = open_now >= limits.max_connections + PROBE_RESERVE
            limits.cap_reached(open_now, full)
            if full:
                limits.refused(TooManyConnections("too many connections"))
                self.transport = transport  # what connection_lost closes
                transport.abort()
                return
            self._probe_only = True
        super().connection_made(transport)
        self._since = self._last_read = self.loop.time()
        self._timer = self.loop.call_at(self._since + limits.check_interval, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self._last_read = self.loop.time()
        if self._phase != _BODY:
            if self._phase == _APP:  # the next request on a kept-alive connection: its head is due from now
                self._phase = _HEAD
                self._since = now
            self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self._phase == _HEAD and self._head_bytes > self.limits.max_header_bytes \
                and not self.transport.is_closing():
            self._refuse(self._too_large())

    def on_headers_complete(self) -> None:
        limits = self.limits
        self._phase = _BODY
        if len(self.headers) <= limits.max_headers and self._head_bytes <= limits.max_header_bytes \
                and not self._probe_only:
            HttpToolsProtocol.on_headers_complete(self)  # the normal path
            return
        refusal = self._refusal()
        if refusal is None:
            super().on_headers_complete()
            if self._probe_only and self.cycle is not None:
                self.cycle.keep_alive = False  # one request per reserved connection
            return
        app, self.app = self.app, refusal
        try:
            super().on_headers_complete()  # uvicorn runs the refusal as the request's app
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._phase = _APP
        self._head_bytes = 0

    def _refusal(self) -> _ASGIApp | None:
        """An app answering the request whose head is now whole, when it is refused; None when it may
        go on."""
        limits = self.limits
        exc: TokenboothError
        if len(self.headers) > limits.max_headers or (
                self._head_bytes > limits.max_header_bytes and self._head_size() > limits.max_header_bytes):
            exc = self._too_large()
        elif self._probe_only and self.url.partition(b"?")[0] not in PROBE_PATHS:
            exc = TooManyConnections(f"The gateway holds all the connections it may (limits.max_connections="
                                     f"{limits.max_connections}); retry in a moment.")
        else:
            return None
        limits.refused(exc)

        async def refuse(scope: Any, receive: Any, send: Any) -> None:
            headers, body = _rendered(exc, anthropic=scope["path"].startswith("/v1/messages"))
            await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return refuse

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large(self) -> HeadersTooLarge:
        limits = self.limits
        return HeadersTooLarge(f"The request's headers are larger than this gateway accepts ({limits.max_header_bytes} "
                               f"bytes, limits.max_header_bytes; at most {limits.max_headers} headers, "
                               "limits.max_headers).")

    def _check(self) -> None:
        """The connection's one timer: close it if what it waits for is late, else look again when it
        would be."""
        self._timer = None
        limits = self.limits
        now = self.loop.time()
        if self._phase == _HEAD:
            due = self._since + limits.header_timeout
        elif self._phase == _BODY:
            if self.cycle.response_complete:
                # answered early (a 413, say) while the body still arrives, which nobody will read: close
                # at the next look, so that the client has had a moment to read the answer
                if self._draining:
                    self.transport.close()
                    return
                self._draining = True
            if self.flow.read_paused:  # the gateway is not reading: the client cannot be late
                self._last_read = now
            due = self._last_read + limits.body_timeout
        else:
            due = now + limits.check_interval
        if due - now > 0.001:  # timers may fire a little early
            # the next look: when this is due, or when a head or a body beginning now could be
            self._timer = self.loop.call_at(min(due, now + limits.check_interval), self._check)
        elif self._phase == _HEAD and self._head_bytes == 0:
            self.transport.close()  # nothing was asked: nothing to answer, nothing to count
        else:
            head = self._phase == _HEAD
            what, key = ("headers", "header_timeout") if head else ("body", "body_timeout")
            limit = limits.header_timeout if head else limits.body_timeout
            self._refuse(RequestTimeout(f"The request's {what} did not arrive in time ({limit:g} s, limits.{key})."))

    def _refuse(self, exc: TokenboothError) -> None:
        """Answer ``exc`` (unless a response is under way on this connection) and close it."""
        self.limits.refused(exc)
        if self._phase == _BODY:
            quiet = not self.pipeline and not self.cycle.response_started
        else:  # a head: the previous request on this connection must be answered already
            quiet = self.cycle is None or self.cycle.response_complete
        if quiet:
            headers, body = _rendered(exc, anthropic=self.url.startswith(b"/v1/messages"))
            self.transport.write(b"".join([STATUS_LINE[exc.status_code],
                                           *(b"%s: %s\r\n" % header for header in headers), b"\r\n", body]))
        self.transport.close()


def _rendered(exc: TokenboothError, *, anthropic: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of a connection-level refusal, which closes its connection."""
    body = orjson.dumps(exc.anthropic_body() if anthropic else exc.openai_body())
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"connection", b"close"), *exc.headers()]
    return headers, body
