"""The gateway as a bare ASGI application.

Routing is a dict lookup and the handlers speak ASGI directly: a framework's request
and response objects would cost more CPU per call than the whole proxy path
(see ``bench/``). Errors raised by handlers are rendered in one place,
:meth:`Gateway._render_error`, in OpenAI's error format.
"""

from __future__ import annotations

import gc
import hmac
import logging
import os
import re
import sys
import time
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tokenbooth.catalog import Metrics
from tokenbooth.config import Settings
from tokenbooth.control.controller import Controller
from tokenbooth.errors import (
    AuthError,
    CircuitOpen,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
    TokenboothError,
    UpstreamStatusError,
)
from tokenbooth.gateway.caching import build_cache
from tokenbooth.gateway.client import safe_target
from tokenbooth.gateway.connections import ConnectionLimits
from tokenbooth.gateway.notify import PATH_PREFIX as WEBHOOK_PREFIX
from tokenbooth.gateway.notify import Notifier
from tokenbooth.gateway.passthrough import Passthrough
from tokenbooth.gateway.proxy import ENDPOINTS, ClientGone, Proxy, Receive, Send, body_chunks
from tokenbooth.gateway.upstreams import Router
from tokenbooth.ledger.journal import Journal
from tokenbooth.ledger.schema import connect
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.meter import Meter, ModelLabels, TenantLabels
from tokenbooth.pricing import PriceBook, load_price_file
from tokenbooth.tokens import TokenEstimator

__all__ = ["Gateway", "build_gateway"]

log = logging.getLogger("tokenbooth.gateway")

REJECT_REASONS = ("auth", "budget", "rate_limit", "concurrency", "invalid_request", "not_found", "too_large",
                  "headers_too_large", "timeout", "connection_limit")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_JSON = (b"content-type", b"application/json")
_MODELS = re.compile(r"^/v1/models(/[^/]+)?$")  # the gateway's own answer: configured models first


class Gateway:
    """An OpenAI-compatible metering proxy. Create with :func:`build_gateway`."""

    def __init__(self, settings: Settings, proxy: Proxy, registry: CollectorRegistry,
                 ledger: LedgerWriter | None) -> None:
        self.settings = settings
        self.proxy = proxy
        self.registry = registry
        self.ledger = ledger
        self.control: Controller | None = proxy.control
        # every other /v1/ path, forwarded; None when passthrough.enabled is false
        self.passthrough = Passthrough(proxy, settings.passthrough, settings.limits.max_upload_bytes) \
            if settings.passthrough.enabled else None
        self._max_body = settings.limits.max_request_bytes
        self._rejected = proxy.meter.metrics.rejected
        for reason in REJECT_REASONS:  # at 0 from the start, so the first refusal shows in increase()
            self._rejected.labels(reason)
        # what the connections uvicorn serves this app on share (gateway/connections.py)
        self.connection_limits = ConnectionLimits(settings.limits, self._rejected)
        self._admin_key = settings.auth.admin_key() if settings.auth_mode == "keys" else None
        self.notifier = Notifier(settings.notify)  # Alertmanager webhooks -> chat robots
        # Request ids: a random per-process prefix and a counter, unique without a syscall per call.
        self._id_prefix = os.urandom(7).hex()
        self._seq = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def startup(self) -> None:
        if self.ledger is not None:
            self.ledger.start()
        if self.control is not None and self.control.ring is not None:
            self.control.ring.start()
        _tune_interpreter()

    async def shutdown(self) -> None:
        if self.control is not None:
            await self.control.close()  # settlements in progress, and what Redis missed
        if self.proxy.cache is not None:
            await self.proxy.cache.close()
        self.proxy.close()
        self.notifier.close()
        if self.ledger is not None:
            self.ledger.close()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id")
        if rid and _REQUEST_ID.match(rid):
            request_id = rid.decode()
        else:
            self._seq += 1
            request_id = f"{self._id_prefix}{self._seq:010x}"
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            endpoint = ENDPOINTS.get(path)
            if endpoint is not None and (method == "POST" or self.passthrough is None):
                if method != "POST":
                    raise MethodNotAllowed(f"Use POST for {path}.")
                key = self.control.authenticate(headers) if self.control is not None else None
                body = await _read_body(receive, headers, self._max_body)
                await self.proxy.handle(endpoint, body, headers, request_id, send, receive, arrived, key,
                                        scope.get("query_string", b""))
            elif path.startswith(WEBHOOK_PREFIX):
                if method != "POST":
                    raise MethodNotAllowed(f"Use POST for {path}.")
                self._check_admin(headers)
                reply = await self.notifier.handle(path.removeprefix(WEBHOOK_PREFIX),
                                                   await _read_body(receive, headers, self._max_body))
                await _respond(send, 200, reply, b"application/json")
            elif self.passthrough is not None and path.startswith("/v1/") and not _MODELS.match(path):
                # forwarded as the client wrote it (still percent-encoded): a decoded %0D%0A would
                # split the upstream request
                raw = scope.get("raw_path") or path.encode()
                if not (raw.startswith(b"/v1/") and safe_target(raw)):
                    raise InvalidRequest("The request path has characters a URL path may not hold.")
                key = self.control.authenticate(headers) if self.control is not None else None
                await self.passthrough.handle(method, raw.decode("ascii"), scope.get("query_string", b""), headers,
                                              request_id, send, receive, arrived, key)
            elif method not in ("GET", "HEAD"):
                raise NotFound(f"Unknown request URL: {method} {path}.")
            elif path == "/metrics":
                await _respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
            elif path == "/healthz":
                await _respond(send, 200, b'{"status":"ok"}', b"application/json")
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                if self.control is not None:
                    self.control.authenticate(headers)
                await self._models(send, headers, path.removeprefix("/v1/models").lstrip("/") or None)
            else:
                raise NotFound(f"Unknown request URL: {method} {path}.")
        except TokenboothError as exc:
            await self._render_error(send, exc, request_id, anthropic=path.startswith("/v1/messages"))
        except ClientGone:
            pass  # nothing went upstream, nothing to answer or to record

    def _check_admin(self, headers: dict[bytes, bytes]) -> None:
        """Admin endpoints (the Alertmanager webhooks) need the admin key once keys mode is on."""
        if self.settings.auth_mode != "keys":
            return
        given = headers.get(b"authorization", b"")
        given = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        if self._admin_key is None or not hmac.compare_digest(given, self._admin_key.encode()):
            raise AuthError("This endpoint needs the gateway's admin key (auth.admin_key_env) as a Bearer token.")

    async def _render_error(self, send: Send, exc: TokenboothError, request_id: str, *,
                            anthropic: bool = False) -> None:
        rid = (b"x-request-id", request_id.encode())
        if exc.reject_reason is not None:
            self._rejected.labels(exc.reject_reason).inc()
        if isinstance(exc, UpstreamStatusError):
            # The upstream's own error, passed through as it was.
            headers = [(b"content-type", exc.content_type.encode("latin-1")), rid, *exc.headers()]
            await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": exc.body})
            return
        if exc.status_code >= 500 and not isinstance(exc, CircuitOpen):
            # an open circuit is logged once when it opens, not for every call it turns away
            log.warning("request %s failed: %s", request_id, exc.message)
        await send({"type": "http.response.start", "status": exc.status_code,
                    "headers": [_JSON, rid, *exc.headers()]})
        body = exc.anthropic_body() if anthropic else exc.openai_body()
        await send({"type": "http.response.body", "body": orjson.dumps(body)})

    async def _models(self, send: Send, headers: dict[bytes, bytes], model_id: str | None = None) -> None:
        """``/v1/models``: the configured models, then the list of the upstream serving any model;
        ``/v1/models/{id}``: one of them, from the same list."""
        router = self.proxy.router
        data = [{"id": m, "object": "model", "created": 0, "owned_by": router.targets(m)[0][0].name}
                for m in router.explicit_models]
        wildcard = router.wildcard
        if wildcard is not None:
            data += await self._upstream_models(wildcard, headers)
        if model_id is None:
            await _respond(send, 200, orjson.dumps({"object": "list", "data": data}), b"application/json")
            return
        found = next((m for m in data if m.get("id") == model_id), None)
        if found is None:
            raise ModelNotFound(model_id)
        await _respond(send, 200, orjson.dumps(found), b"application/json")

    async def _upstream_models(self, up: Any, headers: dict[bytes, bytes]) -> list[dict[str, Any]]:
        resp = await self.proxy.pools[up.name].request(b"/models", b"", self.proxy.request_headers(up, headers),
                                                       method=b"GET")
        try:
            body = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400:
            raise UpstreamStatusError(resp.status, body, resp.header(b"content-type") or "application/json", up.name)
        try:
            listed = orjson.loads(body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return []
        return [m for m in listed if isinstance(m, dict)]


def _tune_interpreter() -> None:
    """Keep the event loop's tail latency low in a gateway process.

    The ledger writer thread holds the GIL while it turns records into rows; by default the
    interpreter lets a thread keep it for 5 ms before the event loop may run, which showed as
    a 3 ms p99 at one call at a time. Everything built at start-up (price tables, routes,
    modules) is moved out of the collector's sight, so full collections stay short.
    """
    sys.setswitchinterval(0.0005)
    gc.collect()
    gc.freeze()


async def _read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass ``limit`` bytes: by its
    Content-Length before a byte is read, or as it arrives."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):  # the usual case: the whole body in one message
        if len(body) > limit:
            raise RequestTooLarge(limit)
        return body
    rest = [chunk async for chunk in body_chunks(receive, limit - len(body), RequestTooLarge(limit))]
    return b"".join([body, *rest])


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


def build_gateway(settings: Settings, registry: CollectorRegistry | None = None) -> Gateway:
    """Wire a gateway from settings: router, prices, meter, ledger, metrics registry.

    Under ``PROMETHEUS_MULTIPROC_DIR`` (``--workers N``) the metrics are written to shared
    files and ``/metrics`` serves the sum over all worker processes.
    """
    settings.check_exposure()
    settings.check_shared_state()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, tenant_labels=settings.metrics.tenant_labels)
    exposed = registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed)  # type: ignore[no-untyped-call]
    local = load_price_file(settings.pricing.price_file, settings.pricing.fx) if settings.pricing.price_file \
        else []
    prices = PriceBook(local, settings.pricing.fx)
    prices.warm()
    router = Router(settings.upstreams, settings.routes)
    known = set(router.explicit_models) | prices.local_models | set(settings.metrics.extra_models)
    ledger = None
    if settings.ledger.enabled:
        ledger = LedgerWriter(connect(settings.ledger.url), metrics, batch_size=settings.ledger.batch_size,
                              flush_interval=settings.ledger.flush_interval, max_queue=settings.ledger.max_queue,
                              spill_path=settings.ledger.spill_path,
                              journal=Journal(settings.ledger.journal_path()))
    meter = Meter(metrics, ModelLabels(known), ledger, TenantLabels(settings.tenants, settings.metrics.max_tenants))
    estimator = TokenEstimator(use_bpe=settings.tokens.tokenizer == "bpe")
    estimator.warm()
    proxy = Proxy(router, meter, prices, settings.tokens, estimator, max_attempts=settings.max_attempts,
                  journal=ledger.journal if ledger is not None else None, control=build_controller(settings, metrics),
                  default_max_tokens=settings.budgets.default_max_tokens,
                  max_model_length=settings.limits.max_model_length, cache=build_cache(settings, metrics))
    return Gateway(settings, proxy, exposed, ledger)


def build_controller(settings: Settings, metrics: Metrics) -> Controller | None:
    """Keys mode: the key ring on the ledger database, and budget and limit state in Redis
    (``redis.url``) or in process."""
    if settings.auth_mode != "keys":
        return None
    from tokenbooth.control.keys import KeyRing, KeyStore
    from tokenbooth.control.store import MemoryStore, Store

    engine = connect(settings.ledger.url)
    ring = KeyRing(KeyStore(engine), interval=settings.auth.refresh_interval)
    store: Store
    if settings.redis.url:
        from tokenbooth.control.redis import RedisStore

        errors = metrics.redis_errors
        duration = metrics.redis_duration

        def observe(operation: str, seconds: float, failed: bool) -> None:
            duration.labels(operation).observe(seconds)
            if failed:
                errors.labels(operation).inc()

        store = RedisStore(settings.redis.url, timeout=settings.redis.timeout, observe=observe)
    else:
        store = MemoryStore()
    spend = None
    if settings.ledger.enabled:
        from tokenbooth.ledger.report import spend_since

        fx = settings.pricing.fx

        def spend(check: Any) -> Any:
            assert check.window is not None
            return spend_since(engine, tenant=check.tenant, key_id=check.key_id, since=check.window.start,
                               currency=check.currency, fx=fx)

    return Controller(settings, metrics, ring=ring, store=store, shared=settings.redis.url is not None, spend=spend)
