"""A lean, pipelined Redis connection on asyncio, with hiredis (Redis's own C parser) for RESP.

Why not redis-py's asyncio client: one ``EVALSHA`` through it cost ~146 µs of CPU here, against
~43 µs through this (``bench/control.py`` has the measurement), and a gateway call may make two.
Commands go out as soon as they are issued and their replies are matched in order, so
concurrent calls share one connection without waiting for each other.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = ["Callback", "RedisAddress", "RedisConnection", "RedisReplyError", "bulk", "pack"]

log = logging.getLogger("tokenbooth.control")


def pack(*args: Any) -> bytes:
    """One command in RESP, as Redis reads it."""
    return hiredis.pack_command(args)  # type: ignore[no-any-return]


def bulk(value: bytes) -> bytes:
    """One argument of a command in RESP: for commands assembled from parts encoded ahead."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


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


# What waits for a reply: a future, or a callback given the reply or the error (no future, no
# task, nothing scheduled: settlements, which nobody awaits, take this path).
Callback = Callable[[Any, BaseException | None], None]


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.timeout = timeout
        # who waits for each reply, in the order the commands were written, and by when
        self.waiting: deque[tuple[float, asyncio.Future[Any] | Callback]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.held: list[bytes] = []  # commands not written yet: all of one loop turn go in one write
        self.flush: asyncio.Handle | None = None
        self.urgent = False  # a flush at the end of this loop turn is scheduled (not only a deferred one)
        self.watchdog: asyncio.TimerHandle | None = None  # one timer for every reply awaited

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

    def expect(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any] | Callback, defer: float) -> None:
        """Register who gets the reply of the command held next, due within ``timeout + defer``."""
        self.waiting.append((loop.time() + self.timeout + defer, waiter))
        if self.watchdog is None:
            self.watchdog = loop.call_at(self.waiting[0][0], self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog: the oldest command not answered in time fails, and the connection with it
        (later replies could no longer be matched to their commands)."""
        self.watchdog = None
        if not self.waiting:
            return
        due = self.waiting[0][0]
        if due > loop.time():
            self.watchdog = loop.call_at(due, self._check, loop)
            return
        _, waiter = self.waiting.popleft()
        _deliver(waiter, None, TimeoutError(f"Redis did not answer within {self.timeout:g} s"))
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:
                continue  # a reply to a command whose waiter gave up: the connection is closed anyway
            _, waiter = self.waiting.popleft()
            if isinstance(reply, RedisReplyError):
                _deliver(waiter, None, reply)
            else:
                _deliver(waiter, reply, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("Redis closed the connection")
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiting:
            _, waiter = self.waiting.popleft()
            _deliver(waiter, None, ConnectionError(f"Redis connection lost: {self.lost}"))


def _deliver(waiter: asyncio.Future[Any] | Callback, reply: Any, exc: BaseException | None) -> None:
    if isinstance(waiter, asyncio.Future):
        if waiter.done():
            return
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(reply)
    else:
        try:
            waiter(reply, exc)
        except Exception:  # a callback's failure must not break the connection for every other call
            log.exception("a Redis reply callback failed")


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
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self.timeout), a.path)
        else:
            _, proto = await loop.create_connection(lambda: _Protocol(self.timeout), a.host, a.port, ssl=context,
                                                    server_hostname=a.host if a.tls else None)
        self._proto = proto
        if a.password:
            auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
            await self._send(proto, pack(*auth))
        if a.db:
            await self._send(proto, pack("SELECT", a.db))
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

    def _send(self, proto: _Protocol, command: bytes, defer: float = 0.0) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write(proto, command, fut, defer)
        return fut

    @staticmethod
    def _write(proto: _Protocol, command: bytes, waiter: asyncio.Future[Any] | Callback, defer: float) -> None:
        loop = asyncio.get_running_loop()
        assert proto.transport is not None
        proto.expect(loop, waiter, defer)  # replies come in the order the commands are written: held ones first
        proto.hold(command, loop, defer)

    def ready(self) -> bool:
        """Whether a connection is open, so :meth:`send` may be used."""
        return self._proto is not None and self._proto.lost is None

    def send(self, command: bytes, callback: Callback, *, defer: float = 0.0) -> None:
        """Send one command, encoded (:func:`pack`), on the open connection (see :meth:`ready`);
        ``callback(reply, error)`` gets its reply, straight from the reading of it.

        Commands issued in one turn of the event loop go out in one write at its end (one syscall
        and one wake-up of Redis for all). ``defer`` > 0 holds the command back for up to that many
        seconds instead, to go out with the next command, or alone after it.
        """
        assert self._proto is not None
        self._write(self._proto, command, callback, defer)

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply; raises ``RedisReplyError``, ``TimeoutError`` or
        ``OSError`` / ``ConnectionError``."""
        return await self.execute_packed(pack(*args))

    async def execute_packed(self, command: bytes) -> Any:
        """:meth:`execute` for a command already encoded in RESP."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._ready()
        return await self._send(proto, command)

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.write_held()
            proto.transport.close()
