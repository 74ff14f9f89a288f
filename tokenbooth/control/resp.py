"""A lean, pipelined Redis connection on asyncio, with hiredis (Redis's own C parser) for RESP.

Why not redis-py's asyncio client: one ``EVALSHA`` through it cost ~146 µs of CPU here, against
~43 µs through this (``bench/control.py`` has the measurement), and a gateway call may make two.
Commands go out as soon as they are issued and their replies are matched in order, so
concurrent calls share one connection without waiting for each other.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = ["RedisAddress", "RedisConnection", "RedisReplyError"]


class RedisReplyError(Exception):
    """Redis answered a command with an error (``NOSCRIPT``, ``WRONGTYPE``, ...)."""


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis server is, parsed from ``redis://``, ``rediss://`` or ``unix://`` URLs."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """>>> RedisAddress.parse("redis://:pw@cache:6380/2").port
        6380
        """
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        db = int(query.get("db", ["0"])[0])
        if parts.scheme == "unix":
            return cls(path=parts.path, db=db, username=parts.username and unquote(parts.username),
                       password=parts.password and unquote(parts.password))
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None, tls=parts.scheme == "rediss")

    def safe(self) -> str:
        """The address for messages, never the password."""
        where = self.path or f"{self.host}:{self.port}"
        return f"{'rediss' if self.tls else 'redis'}://{where}/{self.db}"


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.held: list[bytes] = []  # commands not written yet: all of one loop turn go in one write
        self.flush: asyncio.Handle | None = None
        self.urgent = False  # a flush at the end of this loop turn is scheduled (not only a deferred one)

    def hold(self, data: bytes, loop: asyncio.AbstractEventLoop, defer: float) -> None:
        """Queue a command. ``defer`` > 0: written with the next command, or within ``defer`` seconds.
        Otherwise the first command of a loop turn goes out at once (with any deferred ones), and
        the others of that turn together at its end."""
        self.held.append(data)
        if defer > 0:
            if self.flush is None:
                self.flush = loop.call_later(defer, self.write_held)
            return
        if self.urgent:
            return  # a flush at the end of this turn is due already
        if self.flush is not None:
            self.flush.cancel()
        self.write_held()
        self.flush = loop.call_soon(self.write_held)
        self.urgent = True

    def write_held(self) -> None:
        self.flush = None
        self.urgent = False
        if self.held and self.transport is not None and self.lost is None:
            data = b"".join(self.held) if len(self.held) > 1 else self.held[0]
            self.held.clear()
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:
                continue  # a reply to a command whose waiter gave up: the connection is closed anyway
            fut = self.waiting.popleft()
            if not fut.done():
                if isinstance(reply, RedisReplyError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("Redis closed the connection")
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(f"Redis connection lost: {self.lost}"))


class RedisConnection:
    """One connection; :meth:`execute` sends a command and awaits its reply within ``timeout``.

    A reply that does not come in time closes the connection (later replies could no longer be
    matched to their commands); the next command opens a new one.
    """

    def __init__(self, address: RedisAddress, timeout: float = 0.25) -> None:
        self.address = address
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        a = self.address
        context = ssl.create_default_context() if a.tls else None
        if a.path:
            _, proto = await loop.create_unix_connection(_Protocol, a.path)
        else:
            _, proto = await loop.create_connection(_Protocol, a.host, a.port, ssl=context,
                                                    server_hostname=a.host if a.tls else None)
        self._proto = proto
        if a.password:
            auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
            await self._send(proto, auth)
        if a.db:
            await self._send(proto, ("SELECT", a.db))
        return proto

    async def _ready(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        self._proto = None
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(asyncio.wait_for(self._connect(), self.timeout * 4))
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    def _send(self, proto: _Protocol, args: Sequence[Any], defer: float = 0.0) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        assert proto.transport is not None
        proto.waiting.append(fut)  # replies come in the order the commands are written: held ones first
        proto.hold(hiredis.pack_command(tuple(args)), loop, defer)
        timer = loop.call_later(self.timeout + defer, self._expire, proto, fut)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def _expire(self, proto: _Protocol, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            fut.set_exception(TimeoutError(f"Redis did not answer within {self.timeout:g} s"))
            if proto.transport is not None:
                proto.transport.abort()

    def ready(self) -> bool:
        """Whether a connection is open, so :meth:`send` may be used."""
        return self._proto is not None and self._proto.lost is None

    def send(self, *args: Any, defer: float = 0.0) -> asyncio.Future[Any]:
        """Send one command on the open connection (see :meth:`ready`); the future holds its reply.

        Commands issued in one turn of the event loop go out in one write at its end (one syscall
        and one wake-up of Redis for all). ``defer`` > 0 holds the command back for up to that many
        seconds instead, to go out with the next command, or alone after it.
        """
        assert self._proto is not None
        return self._send(self._proto, args, defer)

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply; raises ``RedisReplyError``, ``TimeoutError`` or
        ``OSError`` / ``ConnectionError``."""
        proto = await self._ready()
        return await self._send(proto, args)

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.write_held()
            proto.transport.close()
