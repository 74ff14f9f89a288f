"""The response cache: exact-match answers kept and replayed, so a repeated call costs nothing.

- :mod:`~tokenbooth.cache.key`: the cache key, a SHA-256 over a canonical JSON of the request
  and everything else that decides its answer (pure, no I/O).
- :mod:`~tokenbooth.cache.entry`: what is kept of an answer (its body, or a stream's events, with
  its usage) and how it is written to bytes.
- :mod:`~tokenbooth.cache.memory` and :mod:`~tokenbooth.cache.redis`: the two backends, an
  in-process LRU bounded in bytes and Redis shared by every replica and worker.

It knows no HTTP: the gateway (``tokenbooth/gateway/caching.py``) decides per request whether to
look up and store, replays a hit to the client, and records it.
"""

from __future__ import annotations

from tokenbooth.cache.entry import Entry
from tokenbooth.cache.key import KEY_VERSION, cache_key
from tokenbooth.cache.memory import Backend, CacheUnavailable, MemoryBackend

__all__ = ["KEY_VERSION", "Backend", "CacheUnavailable", "Entry", "MemoryBackend", "cache_key"]
