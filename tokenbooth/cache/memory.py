"""The backend interface, and the in-process backend: an LRU bounded in bytes, with TTLs."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from tokenbooth.cache.entry import Entry

__all__ = ["Backend", "CacheUnavailable", "MemoryBackend"]


class CacheUnavailable(Exception):
    """The backend failed or did not answer in time: the call is a miss."""


class Backend(Protocol):
    """Where entries live. ``get`` raises :class:`CacheUnavailable` on failure; ``put`` never
    raises (a store that fails is counted through ``on_error``, the call has its answer)."""

    name: str

    async def get(self, key: str) -> Entry | None: ...

    def put(self, key: str, entry: Entry, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """Entries of this process, the least recently used evicted first once their sizes pass
    ``max_bytes``; ``gauges(entries, bytes)`` is told of a change at most once a second.

    >>> backend = MemoryBackend(max_bytes=1 << 20)
    """

    name = "memory"

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.time,
                 gauges: Callable[[int, int], Any] | None = None) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._gauges = gauges
        self._told = -1.0  # monotonic time the gauges were last told
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Entry | None:
        return self.lookup(key)

    def lookup(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        size = entry.size
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key, tell=False)
        self._entries[key] = (self.clock() + ttl, entry)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)), tell=False)
        self._tell()

    def _drop(self, key: str, tell: bool = True) -> None:
        _, entry = self._entries.pop(key)
        self.bytes -= entry.size
        if tell:
            self._tell()

    def _tell(self) -> None:
        if self._gauges is not None and (now := time.monotonic()) - self._told >= 1.0:
            self._told = now
            self._gauges(len(self._entries), self.bytes)

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0
