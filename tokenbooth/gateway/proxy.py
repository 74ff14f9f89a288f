"""Forwarding one API call to its upstream, and turning what happened into a CallRecord."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from tokenbooth.cache.entry import Entry
from tokenbooth.calls import ENDPOINTS, CallState, Endpoint, Format, Recorder, follower_for
from tokenbooth.config import TokensConfig, UpstreamConfig
from tokenbooth.control.controller import Controller, Demand, RateState, Ticket
from tokenbooth.control.keys import ClientKey
from tokenbooth.errors import (
    CircuitOpen,
    ErrorType,
    InvalidRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamStatusError,
)
from tokenbooth.gateway.caching import CACHED, Capture, Plan, ResponseCache
from tokenbooth.gateway.client import Pool, UpstreamResponse
from tokenbooth.gateway.resilience import Breaker, CircuitState, RetryPolicy, parse_retry_after
from tokenbooth.gateway.upstreams import Router
from tokenbooth.ledger.journal import Journal
from tokenbooth.meter import Meter
from tokenbooth.pricing import PriceBook, cost_of
from tokenbooth.record import NO_USAGE, CallRecord, Cost, Operation, Outcome, TokenUsage
from tokenbooth.streams import StreamFollower
from tokenbooth.tokens import TokenEstimator

__all__ = ["ENDPOINTS", "Endpoint", "Proxy"]

log = logging.getLogger("tokenbooth.gateway")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


# Request headers passed to the upstream besides authorization and content type.
_FORWARD_REQUEST = frozenset({b"openai-organization", b"openai-project", b"openai-beta", b"accept-language",
                              b"anthropic-version", b"anthropic-beta"})
# Response headers passed back to the client.
_FORWARD_RESPONSE = frozenset({
    b"retry-after", b"retry-after-ms", b"openai-model", b"openai-processing-ms", b"openai-version",
    b"x-ratelimit-limit-requests", b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-requests",
    b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-requests", b"x-ratelimit-reset-tokens",
    b"anthropic-ratelimit-requests-limit", b"anthropic-ratelimit-requests-remaining",
    b"anthropic-ratelimit-requests-reset", b"anthropic-ratelimit-tokens-limit",
    b"anthropic-ratelimit-tokens-remaining", b"anthropic-ratelimit-tokens-reset", b"request-id",
})
_WATCH_AFTER = 0.05  # seconds a call runs before its client's hang-up is watched for
# The upstream's rate-limit headers, replaced by the gateway's own when a key's limits apply.
_RATE_HEADERS = frozenset(h for h in _FORWARD_RESPONSE if h.startswith(b"x-ratelimit-"))
_OWN_RATE_HEADERS = frozenset({b"x-ratelimit-limit-requests", b"x-ratelimit-limit-tokens"})


def _asks_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def rate_headers(states: tuple[RateState, ...]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the tightest RPM and TPM limits of a call."""
    out = []
    for s in states:
        what = b"requests" if s.name == "rpm" else b"tokens"
        out += [(b"x-ratelimit-limit-" + what, str(s.limit).encode()),
                (b"x-ratelimit-remaining-" + what, str(s.remaining).encode()),
                (b"x-ratelimit-reset-" + what, _duration(s.reset).encode())]
    return out


def _duration(seconds: float) -> str:
    """A wait as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def provider_of(up: UpstreamConfig, ep: Endpoint) -> str:
    """The provider label of a call: an Anthropic-format call to an upstream configured as the
    generic ``openai`` (the one-line ``--upstream`` form) is an Anthropic call."""
    return "anthropic" if ep.fmt == "anthropic" and up.provider == "openai" else up.provider


def _max_output(payload: dict[str, Any], default: int) -> int:
    """The output tokens a request may generate: its max_tokens (any spelling) times ``n``."""
    limit = default
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if type(value) is int and value > 0:
            limit = value
            break
    n = payload.get("n")
    return limit * (n if type(n) is int and 1 < n <= 128 else 1)


class ClientGone(Exception):
    """The client hung up, or was cut off (``limits.body_timeout``), before its body was whole."""


async def body_chunks(receive: Receive, limit: int, too_large: Exception) -> AsyncIterator[bytes]:
    """The request body as it arrives; ``too_large`` is raised once it passes ``limit`` bytes,
    :class:`ClientGone` if the client goes first."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        yield chunk
        if not message.get("more_body"):
            return


class HangupWatch:
    """Cancels the task serving a call when its client hangs up, until the answer is complete.

    uvicorn's ``receive()`` yields ``http.disconnect`` once the request body is read and the
    client goes away; the watch waits for it beside the call. It starts only once the call has
    run ``_WATCH_AFTER`` seconds: a call answered sooner (most of them) costs a timer, not a task.
    ``done()`` ends the watch: from then on (the client has its whole answer) a hang-up no longer
    cancels anything.
    """

    __slots__ = ("_receive", "_task", "_timer", "_watcher", "disconnected", "finished")

    def __init__(self, receive: Receive) -> None:
        self.finished = False
        self.disconnected = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Future[dict[str, Any]] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(_WATCH_AFTER, self._start)

    def _start(self) -> None:
        self._timer = None
        if not self.finished:
            self._watcher = asyncio.ensure_future(self._receive())
            self._watcher.add_done_callback(self._heard)

    def _heard(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        if self.finished or fut.cancelled() or fut.exception() is not None:
            return
        if fut.result().get("type") == "http.disconnect" and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def done(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def take(self) -> bool:
        """Whether a cancellation was this watch's (the client hung up); it is then absorbed."""
        if not self.disconnected or self._task is None:
            return False
        self._task.uncancel()
        return True


class Proxy:
    """Sends client calls to upstreams and meters every one of them."""

    def __init__(self, router: Router, meter: Meter, prices: PriceBook,
                 tokens: TokensConfig | None = None, estimator: TokenEstimator | None = None, *,
                 max_attempts: int = 6, journal: Journal | None = None, control: Controller | None = None,
                 default_max_tokens: int = 4096, max_model_length: int = 256,
                 cache: ResponseCache | None = None) -> None:
        self.router = router
        self.cache = cache
        self.max_model_length = max_model_length
        self.control = control
        self.default_max_tokens = default_max_tokens
        # in keys mode a client's own credentials (its tokenbooth key) never go upstream
        self.forward_client_auth = control is None or control.mode != "keys"
        self.journal = journal
        self.meter = meter
        self.recorder = Recorder(meter, prices, tokens, estimator)
        self.pools = {up.name: Pool(up.base_url, up.timeout, upstream=up.name, proxy=up.proxy_url())
                      for up in router.upstreams}
        # Keys are read from their env vars once, at start-up, and live only in these headers.
        self._keys = {up.name: key for up in router.upstreams if (key := up.api_key())}
        # an upstream (a relay, say) may quote the key it was sent in an error: never to the client
        self._secrets = tuple({key.encode() for key in self._keys.values() if len(key) >= 8})
        self._fixed = {(up.name, fmt): self._fixed_headers(up, fmt)
                       for up in router.upstreams for fmt in ("openai", "anthropic")}
        self.max_attempts = max_attempts
        self.policies = {up.name: RetryPolicy(up.retry) for up in router.upstreams}
        self.breakers = {up.name: Breaker(up.circuit, self._circuit_gauge(up.name)) for up in router.upstreams}
        for up in router.upstreams:
            meter.metrics.circuit_state.labels(up.name).set(0)

    def _circuit_gauge(self, upstream: str) -> Callable[[CircuitState], None]:
        gauge = self.meter.metrics.circuit_state.labels(upstream)

        def on_change(state: CircuitState) -> None:
            gauge.set(int(state))
            log.warning("circuit of upstream %s is now %s", upstream, state.name.lower().replace("_", "-"))

        return on_change

    def redact(self, data: bytes) -> bytes:
        """``data`` with every upstream key in it replaced by ``[redacted]``."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, b"[redacted]")
        return data

    def close(self) -> None:
        """Close the idle upstream connections."""
        for pool in self.pools.values():
            pool.close()

    def _fixed_headers(self, up: UpstreamConfig, fmt: Format) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        key = self._keys.get(up.name)
        if key:
            auth = (b"x-api-key", key.encode()) if fmt == "anthropic" else (b"authorization", f"Bearer {key}".encode())
            headers.append(auth)
        return headers

    def request_headers(self, up: UpstreamConfig, client: Mapping[bytes, bytes],
                        fmt: Format = "openai") -> list[tuple[bytes, bytes]]:
        """The headers an upstream gets: content type, the upstream's key if it has one (else the
        client's own ``Authorization`` / ``x-api-key``), and the provider headers the client sent."""
        headers = self._fixed[up.name, fmt]
        extra = [(name, client[name]) for name in _FORWARD_REQUEST if name in client]
        if up.name not in self._keys and self.forward_client_auth:
            extra += [(name, client[name]) for name in (b"authorization", b"x-api-key") if name in client]
        return headers + extra if extra else headers

    async def handle(self, ep: Endpoint, body: bytes, client_headers: Mapping[bytes, bytes],
                     request_id: str, send: Send, receive: Receive, arrived: float | None = None,
                     key: ClientKey | None = None, query: bytes = b"") -> None:
        """Serve one API call; raises a TokenboothError before the response starts on failure."""
        t0 = arrived if arrived is not None else time.perf_counter()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequest("We could not parse the JSON body of your request.") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", "model")
        if len(model) > self.max_model_length:  # names are cached and labelled: their size is bounded
            raise InvalidRequest(f"The model name is longer than {self.max_model_length} characters "
                                 "(limits.max_model_length).", "model")
        if ep.required and ep.required not in payload:
            raise InvalidRequest(f"Missing required parameter: '{ep.required}'.", ep.required)
        stream = payload.get("stream")
        if stream is None:  # OpenAI's spec: nullable, default false
            stream = False
        elif not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", "stream")
        targets = self.router.targets(model)
        session_id = client_headers.get(b"x-tokenbooth-session")
        plan: Plan | None = None
        if self.cache is not None and ep.operation in CACHED:
            plan = self._cache_plan(ep, payload, stream, targets[0][0], targets[0][1], client_headers, key, query)
            if plan.lookup:
                entry = await self.cache.lookup(plan)
                if entry is not None:  # answered here: no admission, nothing reserved or settled
                    await self._serve_hit(ep, entry, targets[0], model, payload, stream, request_id, send, t0, key,
                                          session_id)
                    return
        ticket: Ticket | None = None
        if self.control is not None and key is not None:
            checks = self.control.plan(key)
            if not self.control.needs_demand(checks):
                demand = None
            elif ep.operation is Operation.COUNT_TOKENS:
                demand = Demand(0, None)  # counting tokens costs nothing and uses no tokens
            else:
                demand = self._demand(ep, model, targets, payload)
            ticket = await self.control.admit(checks, demand)  # raises the refusal; nothing went upstream

        call = CallState(provider_of(targets[0][0], ep), targets[0][0].name, targets[0][1])
        if ticket is not None and ticket.rates:
            call.response_headers = rate_headers(ticket.rates)
        capture = None
        if plan is not None:
            call.response_headers.append(plan.header)
            if plan.store and self.cache is not None:
                capture = self.cache.capture()
        started_at = time.time()
        in_flight = self.meter.in_flight(targets[0][0].provider, model)
        in_flight.inc()
        if self.journal is not None:
            self.journal.begin()
        watch = HangupWatch(receive)
        try:
            path = ep.upstream_path.encode() + (b"?" + query if query else b"")  # ?beta=true reaches upstream
            await self._attempts(targets, ep, path, model, payload, body, stream, client_headers, request_id, call,
                                 t0, send, watch, capture)
        except UpstreamError as exc:
            call.error_type = exc.error_type
            call.status = exc.status_code
            raise
        except asyncio.CancelledError:
            if not watch.take():
                raise
            # the client hung up: the upstream connection is closed already (the task's cancellation
            # aborted it); what was generated, if anything, is estimated
            call.outcome = Outcome.CANCELLED
            call.error_type = ErrorType.CANCELLED
            if call.output_text is None and call.reported is None:
                call.output_text = ""  # the prompt was sent: estimate it, and no output
        finally:
            watch.close()
            record = self.conclude(call, ticket, in_flight, key, request_id=request_id, operation=ep.operation,
                                   model=model, payload=payload, started_at=started_at,
                                   duration=time.perf_counter() - t0, streamed=stream,
                                   session_id=session_id.decode("latin-1")[:128] if session_id else None,
                                   cache=plan.result if plan is not None else None)
            if capture is not None and capture.complete and self.cache is not None and plan is not None:
                self.cache.store(plan, capture, record)

    def _cache_plan(self, ep: Endpoint, payload: dict[str, Any], stream: bool, up: UpstreamConfig,
                    target_model: str, client_headers: Mapping[bytes, bytes], key: ClientKey | None,
                    query: bytes) -> Plan:
        assert self.cache is not None
        forwarded = [(name, client_headers[name]) for name in _FORWARD_REQUEST if name in client_headers]
        credential = None
        if up.name not in self._keys and self.forward_client_auth:  # the client's own key goes upstream
            credential = client_headers.get(b"authorization") or client_headers.get(b"x-api-key")
        return self.cache.plan(ep, payload, stream, up.name, target_model, client_headers, forwarded, key,
                               credential, query)

    async def _serve_hit(self, ep: Endpoint, entry: Entry, target: tuple[UpstreamConfig, str], model: str,
                         payload: dict[str, Any], stream: bool, request_id: str, send: Send, t0: float,
                         key: ClientKey | None, session_id: bytes | None) -> None:
        """Answer a call from the cache and record it: its own row, cost 0, what it saved."""
        assert self.cache is not None
        up, target_model = target
        call = CallState(provider_of(up, ep), up.name, target_model)
        call.status, call.reported, call.served_model = 200, NO_USAGE, entry.served_model
        started_at = time.time()
        in_flight = self.meter.in_flight(up.provider, model)
        in_flight.inc()
        if self.journal is not None:
            self.journal.begin()
        strip = stream and ep.fmt == "openai" and not ep.responses and not _asks_usage(payload)
        try:
            await self.cache.replay(entry, send, self.cache.hit_headers(entry, request_id), strip)
            call.outcome = Outcome.SUCCESS
        except asyncio.CancelledError:
            call.outcome, call.error_type = Outcome.CANCELLED, ErrorType.CANCELLED
            raise
        finally:
            self.conclude(call, None, in_flight, key, request_id=request_id, operation=ep.operation, model=model,
                          payload=payload, started_at=started_at, duration=time.perf_counter() - t0, streamed=stream,
                          session_id=session_id.decode("latin-1")[:128] if session_id else None, cache="hit",
                          saved=entry.usage if call.outcome is Outcome.SUCCESS else None)

    def conclude(self, call: CallState, ticket: Ticket | None, in_flight: Any, key: ClientKey | None,
                 **fields: Any) -> CallRecord:
        """Record a finished call (``fields`` go to :meth:`Recorder.finish`), settle its reservation,
        and only then take it out of flight, so a drained gateway has recorded everything."""
        try:
            record = self.recorder.finish(call, tenant=key.tenant if key is not None else None,
                                          key_id=key.id if key is not None else None, **fields)
            if ticket is not None and self.control is not None:
                self.control.settle(ticket, record)
            if self.journal is not None:
                self.journal.end()
        finally:
            in_flight.dec()
        return record

    def _demand(self, ep: Endpoint, model: str, targets: tuple[tuple[UpstreamConfig, str], ...],
                payload: dict[str, Any]) -> Demand:
        """The call's worst case, for its reservation: the prompt counted locally, the most output
        it may ask for, at the dearest price along its fallback chain."""
        tokens_in = self.recorder.estimator.prompt(model, payload)
        out = 0 if ep.operation is Operation.EMBEDDINGS else _max_output(payload, self.default_max_tokens)
        prices = self.recorder.prices
        worst: Cost | None = None
        for up, target_model in targets:
            price = prices.lookup(target_model, provider=up.provider, upstream=up.name)
            if price is None:
                continue
            # the output may all be reasoning: priced at the dearer of the two rates
            reasoning = out if price.reasoning > price.output else 0
            amount = cost_of(price, TokenUsage(input=tokens_in, output=out, reasoning=reasoning))
            usd = amount * prices.fx[price.currency]
            if worst is None or usd > worst.usd:
                worst = Cost(amount, price.currency, usd, price.source)
        return Demand(tokens_in + out, worst)

    def _body_for(self, up: UpstreamConfig, ep: Endpoint, model: str, target_model: str,
                  payload: dict[str, Any], body: bytes, stream: bool) -> tuple[bytes, bool]:
        """The request body for one target, and whether stream usage was asked on the client's behalf."""
        changed: dict[str, Any] = {}
        if target_model != model:
            changed["model"] = target_model
        strip_usage = False
        # the Responses API always reports usage in its terminal event, and rejects stream_options
        if stream and ep.fmt == "openai" and not ep.responses and ep.operation is not Operation.EMBEDDINGS \
                and up.stream_usage:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Ask for usage on the client's behalf; what this adds is removed on the way back.
                changed["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                             "include_usage": True}
                strip_usage = True
        if not changed:
            return body, False
        return orjson.dumps({**payload, **changed}), strip_usage

    async def _attempts(self, targets: tuple[tuple[UpstreamConfig, str], ...], ep: Endpoint, path: bytes, model: str,
                        payload: dict[str, Any], body: bytes, stream: bool, client_headers: Mapping[bytes, bytes],
                        request_id: str, call: CallState, t0: float, send: Send, watch: HangupWatch,
                        capture: Capture | None = None) -> None:
        """Try the targets in order, retrying each as its policy allows, within ``max_attempts`` in all.

        Raises the last failure when every target is exhausted. Nothing is retried once a byte
        of the response has gone to the client (``_forward`` raises only before that).
        """
        last: UpstreamError | None = None
        for index, (up, target_model) in enumerate(targets):
            breaker = self.breakers[up.name]
            next_up = targets[index + 1][0].name if index + 1 < len(targets) else None
            if not breaker.allow():
                last = CircuitOpen(up.name, breaker.retry_in())
                if next_up is not None:
                    self.meter.metrics.fallbacks.labels(up.name, next_up, "circuit_open").inc()
                    call.path.append(f"{up.name}:{target_model}!circuit_open")
                continue
            target_body, strip_usage = self._body_for(up, ep, model, target_model, payload, body, stream)
            policy = self.policies[up.name]
            tries = 0
            while True:
                if call.attempts >= self.max_attempts:
                    raise last or UpstreamConnectError("no attempts left", up.name)
                tries += 1
                call.attempts += 1
                call.serve(provider_of(up, ep), up.name, target_model)
                try:
                    await self._forward(up, ep, path, target_body, client_headers, request_id, stream, strip_usage,
                                        call, t0, send, watch, capture)
                except UpstreamError as exc:
                    last = exc
                    status = exc.status_code if isinstance(exc, UpstreamStatusError) else None
                    if Breaker.trips(exc.error_type):
                        breaker.failure()
                    else:
                        breaker.release()
                        raise  # the caller's own 4xx: another upstream would say the same
                    if not policy.retryable(exc.error_type, status) or tries >= up.retry.attempts \
                            or breaker.state is CircuitState.OPEN:
                        break
                    delay = policy.delay(tries, self._retry_after(exc))
                    if delay is None or call.attempts >= self.max_attempts:
                        break  # a Retry-After beyond the cap: fall back or fail, do not hang
                    self.meter.metrics.retries.labels(up.name, exc.error_type.value).inc()
                    await asyncio.sleep(delay)
                    continue
                if call.outcome is Outcome.ERROR and Breaker.trips(call.error_type):
                    breaker.failure()  # a stream that broke after it started
                else:
                    breaker.success()
                return
            if next_up is not None and last is not None:
                self.meter.metrics.fallbacks.labels(up.name, next_up, last.error_type.value).inc()
                call.path.append(f"{up.name}:{target_model}!{last.error_type.value}")
        assert last is not None
        raise last

    @staticmethod
    def _retry_after(exc: UpstreamError) -> float | None:
        if not isinstance(exc, UpstreamStatusError):
            return None
        headers = {k: v for k, v in (("retry-after", exc.retry_after), ("retry-after-ms", exc.retry_after_ms))
                   if v is not None}
        return parse_retry_after(headers) if headers else None

    async def _forward(self, up: UpstreamConfig, ep: Endpoint, path: bytes, body: bytes,
                       client_headers: Mapping[bytes, bytes], request_id: str, stream: bool,
                       strip_usage: bool, call: CallState, t0: float, send: Send, watch: HangupWatch,
                       capture: Capture | None = None) -> None:
        resp = await self.pools[up.name].request(path, body,
                                                 self.request_headers(up, client_headers, ep.fmt))
        try:
            call.status = resp.status
            content_type = resp.header(b"content-type") or "application/json"
            if stream and resp.status == 200 and content_type.startswith("text/event-stream"):
                follower: StreamFollower = follower_for(ep, strip_usage)
                await self._stream(up, ep, resp, follower, request_id, call, t0, send, watch, capture)
                return
            data = await resp.read()
            if resp.status >= 400:
                raise UpstreamStatusError(resp.status, self.redact(data), content_type, up.name,
                                          resp.header(b"retry-after"), resp.header(b"retry-after-ms"))
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamInvalidResponse(
                    f"upstream '{up.name}' answered {resp.status} with a body that is not JSON", up.name
                ) from None
            if not isinstance(parsed, dict):
                raise UpstreamInvalidResponse(f"upstream '{up.name}' answered with an unexpected body",
                                              up.name)
            call.read_response(parsed, ep)
            if capture is not None and not stream:
                capture.body, capture.content_type, capture.complete = data, content_type, resp.status == 200
            watch.done()  # the answer is complete: a client hanging up now has had it
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": self._response_headers(resp, request_id, content_type, call.response_headers)})
            await send({"type": "http.response.body", "body": data, "more_body": False})
        finally:
            resp.release()

    @staticmethod
    def _response_headers(resp: UpstreamResponse, request_id: str, content_type: str,
                          own: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type.encode("latin-1")), (b"x-request-id", request_id.encode())]
        rated = bool(own and own[0][0] in _OWN_RATE_HEADERS)  # rate headers come first (see handle)
        for name, value in resp.headers:
            if name in _FORWARD_RESPONSE:
                if rated and name in _RATE_HEADERS:
                    continue  # the key's own limits are the ones this client lives by
                headers.append((name, value))
            elif name == b"x-request-id":
                headers.append((b"x-upstream-request-id", value))
        if own:
            headers += own
        return headers

    async def _stream(self, up: UpstreamConfig, ep: Endpoint, resp: UpstreamResponse,
                      follower: StreamFollower, request_id: str, call: CallState, t0: float, send: Send,
                      watch: HangupWatch, capture: Capture | None = None) -> None:
        """Pass an SSE stream through as it arrives, metering it on the side.

        A client that hangs up cancels this task (through ``watch``): the upstream connection is
        closed at once and the call recorded as cancelled (by :meth:`handle`).
        """
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._response_headers(resp, request_id, "text/event-stream", call.response_headers)})
        perf = time.perf_counter
        kept = None
        room = 0
        if capture is not None:
            kept = capture.chunks = []
            room = capture.limit
        try:
            try:
                async for chunk in resp:
                    if kept is not None:
                        kept.append(chunk)  # as the upstream sent it: usage asked on the client's behalf included
                        room -= len(chunk)
                        if room < 0:  # too big to keep: let go of it now
                            assert capture is not None
                            kept = capture.chunks = None
                            capture.dropped = True
                    seen = follower.content_chunks
                    out = follower.feed(chunk)
                    if follower.content_chunks != seen:
                        now = perf() - t0
                        if call.ttft is None:
                            call.ttft = now
                        call.last_token = now
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if follower.finished:
                        # the client has the whole answer: hanging up now (openai's client closes
                        # at [DONE]) no longer cancels the call; the upstream's end is still read
                        watch.done()
            except UpstreamError as exc:
                call.error_type = exc.error_type
                log.warning("stream %s from %s broke off: %s", request_id, up.name, exc.message)
                await self._end_stream_with_error(send, exc, ep, watch)
                return
            if not follower.finished and follower.error is None:
                cut = UpstreamInvalidResponse(f"upstream '{up.name}' ended the stream before it was complete",
                                              up.name)
                call.error_type = cut.error_type
                log.warning("stream %s: %s", request_id, cut.message)
                await self._end_stream_with_error(send, cut, ep, watch)
                return
            watch.done()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if follower.error is None:
                call.outcome = Outcome.SUCCESS
                if capture is not None:
                    capture.content_type, capture.complete = "text/event-stream", True
            else:
                call.error_type = ErrorType.SERVER_ERROR
        except asyncio.CancelledError:
            resp.close()  # hang up on the upstream at once
            raise
        finally:
            call.take_stream(follower)

    @staticmethod
    async def _end_stream_with_error(send: Send, err: UpstreamError, ep: Endpoint, watch: HangupWatch) -> None:
        """End a stream that broke with an error event, so the client does not hang."""
        if ep.fmt == "anthropic":
            event = b"event: error\ndata: " + orjson.dumps(err.anthropic_body()) + b"\n\n"
        elif ep.responses:
            event = b"event: error\ndata: " + orjson.dumps({"type": "error", "code": err.code,
                                                            "message": err.message, "param": None}) + b"\n\n"
        else:
            event = b"data: " + orjson.dumps(err.openai_body()) + b"\n\n"
        watch.done()
        await send({"type": "http.response.body", "body": event, "more_body": False})
