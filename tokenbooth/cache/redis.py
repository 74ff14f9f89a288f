"""The shared backend: entries in Redis, seen by every replica and worker.

One ``GET`` per lookup and one ``SET … PX`` per store, through the project's own RESP connection
(:mod:`tokenbooth.control.resp`); a store is sent without waiting for its reply, and may wait a
moment to go out in one write with the next command. Each command
touches one key, so no hash tag is needed on Redis Cluster. When Redis fails or does not answer
within ``timeout``, the lookup raises :class:`CacheUnavailable` (the call is a miss) and Redis is
left alone for ``retry_interval`` seconds, so an outage costs one timeout, not one per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from tokenbooth.cache.entry import Entry
from tokenbooth.cache.memory import CacheUnavailable
from tokenbooth.control.resp import RedisAddress, RedisConnection, RedisReplyError, pack

__all__ = ["KEY_PREFIX", "RedisBackend"]

log = logging.getLogger("tokenbooth.cache")

KEY_PREFIX = "tb:cache:"
PUT_DEFER = 0.002  # seconds a store may wait to share a write (one syscall) with the next command
_FAILURES = (OSError, TimeoutError, ConnectionError, RedisReplyError)


class RedisBackend:
    """Entries in Redis at ``url``. A failed lookup raises :class:`CacheUnavailable`; a failed store
    is told to ``on_error("put")`` and never raised into the call."""

    name = "redis"

    def __init__(self, url: str, *, timeout: float = 0.05, retry_interval: float = 1.0,
                 on_error: Callable[[str], Any] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = RedisAddress.parse(url)
        self.conn = RedisConnection(self.address, timeout)
        self.retry_interval = retry_interval
        self.clock = clock
        self._on_error = on_error
        self._down_until = 0.0
        self._logged_down = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> Entry | None:
        if self._down_until and self.clock() < self._down_until:
            raise CacheUnavailable("Redis is away")
        try:
            data = await self.conn.execute_packed(pack("GET", KEY_PREFIX + key))
        except _FAILURES as exc:
            self._failed("get", exc)
            raise CacheUnavailable(str(exc)) from None
        if self._down_until:
            self._down_until = 0.0
            self._logged_down = False
            log.info("the response cache's Redis at %s answers again", self.address.safe())
        if data is None:
            return None
        try:
            return Entry.loads(data)
        except ValueError as exc:  # another version's entry, or not ours: a miss, replaced on store
            log.debug("cache entry %s unreadable: %s", key, exc)
            return None

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        if self._down_until and self.clock() < self._down_until:
            return
        command = pack("SET", KEY_PREFIX + key, entry.dumps(), "PX", max(int(ttl * 1000), 1))
        if self.conn.ready():
            self.conn.send(command, self._stored, defer=PUT_DEFER)
            return
        task = asyncio.ensure_future(self._put_later(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put_later(self, command: bytes) -> None:
        try:
            await self.conn.execute_packed(command)
        except _FAILURES as exc:
            self._failed("put", exc)

    def _stored(self, reply: Any, exc: BaseException | None) -> None:
        if exc is not None:
            self._failed("put", exc)

    def _failed(self, operation: str, exc: BaseException) -> None:
        if operation == "put" and self._on_error is not None:
            self._on_error(operation)
        self._down_until = self.clock() + self.retry_interval
        if not self._logged_down:
            self._logged_down = True
            log.warning("the response cache's Redis at %s failed (%s: %s): calls are misses until it answers",
                        self.address.safe(), type(exc).__name__, exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.conn.close()
