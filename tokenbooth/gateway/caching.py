"""The response cache in the gateway: whether a call may be answered from it or kept in it, the
lookup, the replay of a hit, and the store of a complete answer.

A call's result, in its ``x-tokenbooth-cache`` header, in ``tokenbooth_cache_requests_total`` and
in its ledger row:

- ``hit``: answered from the cache; nothing went upstream, no budget was charged.
- ``miss``: looked up and not found (or the backend failed); a complete 200 answer is stored.
- ``store-skipped``: looked up and not found, and the answer is not to be stored (``no-store``).
- ``bypass``: not looked up: ``Cache-Control: no-cache`` or ``max-age=0`` (the answer is still
  stored), a call asking for a fresh sample, or the cache turned off for its key or tenant.

A streamed call and a plain one are cached apart (the form is part of the key): a hit is always
the form the client asked for, exactly as the upstream sent it, never one converted from the other.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenbooth.cache.entry import Entry, split_events
from tokenbooth.cache.key import cache_key
from tokenbooth.cache.memory import Backend, CacheUnavailable, MemoryBackend
from tokenbooth.calls import Endpoint
from tokenbooth.catalog import Metrics
from tokenbooth.config import CacheConfig, Settings
from tokenbooth.control.keys import ClientKey
from tokenbooth.errors import ConfigError, InvalidRequest
from tokenbooth.record import CallRecord, Operation, Outcome
from tokenbooth.streams import OpenAIStream

__all__ = ["HEADER", "Capture", "Plan", "ResponseCache", "build_cache"]

log = logging.getLogger("tokenbooth.cache")

Send = Callable[[dict[str, Any]], Awaitable[None]]

HEADER = b"x-tokenbooth-cache"
_VALUES = {"hit": b"hit", "miss": b"miss", "bypass": b"bypass", "store_skipped": b"store-skipped"}
CACHED = frozenset({Operation.CHAT, Operation.TEXT_COMPLETION, Operation.EMBEDDINGS})


@dataclass(slots=True)
class Plan:
    """What the cache does for one call: look it up, store its answer, for how long, and what
    its result is so far (``result`` becomes ``hit`` when it is answered from the cache)."""

    key: str | None
    lookup: bool
    store: bool
    result: str
    ttl: float = 0.0
    max_age: float | None = None  # the client's Cache-Control max-age: an older entry is a miss
    upstream: str = ""

    @property
    def header(self) -> tuple[bytes, bytes]:
        return HEADER, _VALUES[self.result]


@dataclass(slots=True)
class Capture:
    """What a call's upstream answered, for the store: the body, or a stream's chunks as they came.
    ``complete`` is set only once the whole answer has been read and passed on; a stream longer than
    ``limit`` bytes is let go of (``dropped``) as soon as it passes it, so it is never held whole."""

    limit: int
    content_type: str = "application/json"
    body: bytes = b""
    chunks: list[bytes] | None = None
    complete: bool = False
    dropped: bool = False


def _directives(headers: Mapping[bytes, bytes], default_ttl: float, max_ttl: float
                ) -> tuple[bool, bool, float, float | None]:
    """``(lookup, store, ttl, max_age)`` from a request's ``Cache-Control`` and
    ``x-tokenbooth-cache-ttl`` headers."""
    lookup = store = True
    ttl = default_ttl
    max_age: float | None = None
    control = headers.get(b"cache-control")
    if control:
        for part in control.decode("latin-1").lower().split(","):
            name, _, value = part.strip().partition("=")
            if name == "no-cache":
                lookup = False
            elif name == "no-store":
                store = False
            elif name == "max-age" and value.strip().strip('"').isdigit():
                max_age = float(value.strip().strip('"'))
                if max_age == 0:
                    lookup = False
    asked = headers.get(b"x-tokenbooth-cache-ttl")
    if asked is not None:
        try:
            ttl = float(asked)
        except ValueError:
            ttl = -1.0
        if not 0 <= ttl < float("inf"):
            raise InvalidRequest("x-tokenbooth-cache-ttl must be a number of seconds, 0 or more.")
        ttl = min(ttl, max_ttl)
        if ttl == 0:
            store = False
    return lookup, store, ttl, max_age


def asks_for_a_sample(ep: Endpoint, payload: dict[str, Any]) -> bool:
    """Whether a call asks for a fresh sample: more than one choice, or a temperature above 0 (unset
    is the APIs' default of 1) with no seed. Repeating it must not repeat one answer: an agent that
    retries a poor answer wants another one."""
    if ep.operation is Operation.EMBEDDINGS:
        return False
    n = payload.get("n")
    if type(n) is int and n > 1:
        return True
    if type(payload.get("seed")) is int:
        return False
    t = payload.get("temperature")
    return not (type(t) in (int, float) and t == 0)


class ResponseCache:
    """Plans, looks up, replays and stores cached answers (see the module's docstring)."""

    def __init__(self, config: CacheConfig, backend: Backend, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self._errors = metrics.cache_errors
        # a memory lookup is one dict read: timing it would cost more than it
        self._lookup_time = metrics.cache_lookup_duration.labels(backend.name) if backend.name != "memory" else None
        for operation in ("get", "put"):
            metrics.cache_errors.labels(operation)
        for result in _VALUES:  # at 0 from the start, so the first hit shows in increase()
            metrics.cache_requests.labels(result)

    def _enabled_for(self, key: ClientKey | None) -> bool:
        if key is None:
            return True
        on = self.config.keys.get(key.id)
        return on if on is not None else self.config.tenants.get(key.tenant, True)

    def plan(self, ep: Endpoint, payload: dict[str, Any], stream: bool, upstream: str, target_model: str,
             headers: Mapping[bytes, bytes], forwarded: list[tuple[bytes, bytes]], key: ClientKey | None,
             credential: bytes | None, query: bytes) -> Plan:
        """What to do for a call to ``upstream``'s ``target_model`` (its first target). ``forwarded``
        are the request headers the upstream gets besides the key; ``credential`` is the client's
        own key when the upstream gets it (then only a client with that key shares the entry)."""
        if not self._enabled_for(key) or (ep.responses and (payload.get("background") is True
                                                              or payload.get("conversation") is not None)):
            # a background response is answered queued; a conversation's answer depends on its state
            return Plan(None, False, False, "bypass")
        if not self.config.sampled and asks_for_a_sample(ep, payload):
            return Plan(None, False, False, "bypass")
        lookup, store, ttl, max_age = _directives(headers, self.config.ttl, self.config.max_ttl)
        if self.config.scope == "tenant":
            scope = "tenant:" + (key.tenant if key is not None else "")
        elif self.config.scope == "key":
            scope = "key:" + (key.id if key is not None else "")
        else:
            scope = "global"
        if credential:
            scope += "|" + hashlib.sha256(credential).hexdigest()
        digest = cache_key(ep.upstream_path, upstream, target_model, payload, scope, stream=stream,
                           headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in forwarded],
                           query=query.decode("latin-1"))
        if digest is None:
            return Plan(None, False, False, "bypass")
        result = "bypass" if not lookup else "miss" if store else "store_skipped"
        return Plan(digest, lookup, store, result, ttl, max_age, upstream)

    async def lookup(self, plan: Plan) -> Entry | None:
        """The entry for a planned call, or None: not there, too old for the client's max-age, or the
        backend failed (counted in ``tokenbooth_cache_errors_total``; never raised)."""
        assert plan.key is not None
        t0 = time.perf_counter() if self._lookup_time is not None else 0.0
        try:
            entry = await self.backend.get(plan.key)
        except CacheUnavailable:
            self._errors.labels("get").inc()
            entry = None
        except Exception:  # the cache must never break a call
            log.exception("response cache lookup failed")
            self._errors.labels("get").inc()
            entry = None
        if self._lookup_time is not None:
            self._lookup_time.observe(time.perf_counter() - t0)
        if entry is not None and plan.max_age is not None and self.clock() - entry.stored_at > plan.max_age:
            return None
        return entry

    def store(self, plan: Plan, capture: Capture, record: CallRecord) -> None:
        """Keep a call's answer if it is a complete 200 from the call's first target, and not too big."""
        if not (capture.complete and not capture.dropped and plan.key is not None and record.outcome is Outcome.SUCCESS
                and record.http_status == 200 and record.upstream == plan.upstream and record.fallback_path is None):
            return
        if capture.chunks is not None:
            body = b"".join(capture.chunks)
            events: tuple[int, ...] | None = split_events(body)
        else:
            body, events = capture.body, None
        if len(body) > self.config.max_entry_bytes:
            return
        entry = Entry(body, capture.content_type, record.usage, record.served_model, self.clock(), events)
        try:
            self.backend.put(plan.key, entry, plan.ttl)
        except Exception:
            log.exception("response cache store failed")
            self._errors.labels("put").inc()

    def hit_headers(self, entry: Entry, request_id: str) -> list[tuple[bytes, bytes]]:
        age = max(int(self.clock() - entry.stored_at), 0)
        return [(b"content-type", entry.content_type.encode("latin-1")), (b"x-request-id", request_id.encode()),
                (HEADER, b"hit"), (b"age", b"%d" % age)]

    @staticmethod
    async def replay(entry: Entry, send: Send, headers: list[tuple[bytes, bytes]], strip_usage: bool) -> None:
        """Send a hit: a body whole, a stream event by event (``strip_usage``: without the usage
        chunk an OpenAI client that did not ask for usage would not have seen)."""
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if entry.events is None:
            await send({"type": "http.response.body", "body": entry.body, "more_body": False})
            return
        follower = OpenAIStream(strip_usage=True) if strip_usage else None
        for chunk in entry.chunks():
            out = follower.feed(chunk) if follower is not None else chunk
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def capture(self) -> Capture:
        return Capture(self.config.max_entry_bytes)

    async def close(self) -> None:
        await self.backend.close()


def build_cache(settings: Settings, metrics: Metrics) -> ResponseCache | None:
    """The response cache of ``settings.cache``: Redis when ``redis.url`` is set (unless
    ``cache.backend: memory``), else in process; None when the cache is off."""
    conf = settings.cache
    if not conf.enabled:
        return None
    kind = conf.backend or ("redis" if settings.redis.url else "memory")
    backend: Backend
    if kind == "redis":
        if not settings.redis.url:
            raise ConfigError("cache.backend is 'redis' but redis.url is not set: set redis.url, or use "
                              "cache.backend: memory.")
        from tokenbooth.cache.redis import RedisBackend

        errors = metrics.cache_errors
        backend = RedisBackend(settings.redis.url, timeout=conf.timeout, retry_interval=settings.redis.retry_interval,
                               on_error=lambda operation: errors.labels(operation).inc())
    else:
        if settings.workers > 1:
            log.warning("cache.backend is memory with %d workers: each worker keeps its own answers, so a repeated "
                        "call hits only when it reaches the same worker; set redis.url to share them",
                        settings.workers)
        entries, size = metrics.cache_entries, metrics.cache_bytes

        def gauges(n: int, nbytes: int) -> None:
            entries.set(n)
            size.set(nbytes)

        backend = MemoryBackend(conf.max_bytes, gauges=gauges)
    return ResponseCache(conf, backend, metrics)
