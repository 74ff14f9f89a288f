"""Forwarding one API call to its upstream, and turning what happened into a CallRecord."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from tokenbooth.config import UpstreamConfig
from tokenbooth.errors import (
    ErrorType,
    InvalidRequest,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamReadTimeout,
    UpstreamStatusError,
)
from tokenbooth.gateway.streaming import SSEMeter
from tokenbooth.gateway.upstreams import Router
from tokenbooth.meter import Meter
from tokenbooth.pricing import PriceBook
from tokenbooth.record import NO_USAGE, CallRecord, Operation, Outcome, TokenUsage
from tokenbooth.tokens import usage_from_openai

__all__ = ["ENDPOINTS", "Endpoint", "Proxy", "translate_client_error"]

log = logging.getLogger("tokenbooth.gateway")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied API route: what it is, where it goes upstream, which field it needs."""

    operation: Operation
    upstream_path: str
    required: str


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(Operation.CHAT, "/chat/completions", "messages"),
    "/v1/completions": Endpoint(Operation.TEXT_COMPLETION, "/completions", "prompt"),
    "/v1/embeddings": Endpoint(Operation.EMBEDDINGS, "/embeddings", "input"),
}

# Request headers passed to the upstream besides authorization and content type.
_FORWARD_REQUEST = frozenset({b"openai-organization", b"openai-project", b"openai-beta", b"accept-language"})
# Response headers passed back to the client.
_FORWARD_RESPONSE = frozenset({
    "retry-after", "retry-after-ms", "openai-model", "openai-processing-ms", "openai-version",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
})


def translate_client_error(exc: BaseException, upstream: str) -> UpstreamError:
    """Map an aiohttp/asyncio exception to the tokenbooth error it stands for.

    The message names the upstream and what went wrong, never a header or key.
    """
    what = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(f"upstream '{upstream}' did not accept a connection in time", upstream)
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UpstreamReadTimeout(f"upstream '{upstream}' did not answer in time", upstream)
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return UpstreamConnectError(f"upstream '{upstream}' is unreachable: {reason}", upstream)
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamInvalidResponse(f"upstream '{upstream}' sent a malformed HTTP response", upstream)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamConnectError(f"upstream '{upstream}' broke off its response ({what})", upstream)
    return UpstreamConnectError(f"upstream '{upstream}' connection failed ({what})", upstream)


def _header_value(value: bytes) -> str:
    return value.decode("latin-1")


class _Call:
    """What is known about one call so far; becomes a CallRecord at the end."""

    __slots__ = ("error_type", "outcome", "served_model", "status", "ttft", "usage")

    def __init__(self) -> None:
        self.outcome = Outcome.ERROR
        self.error_type = ErrorType.NONE
        self.status: int | None = None
        self.usage: TokenUsage | None = None
        self.served_model: str | None = None
        self.ttft: float | None = None


class Proxy:
    """Sends client calls to upstreams and meters every one of them."""

    def __init__(self, router: Router, meter: Meter, prices: PriceBook) -> None:
        self.router = router
        self.meter = meter
        self.prices = prices
        self.session: aiohttp.ClientSession | None = None
        # Keys are read from their env vars once, at start-up, and live only in these headers.
        self._auth = {up.name: f"Bearer {key}" for up in router.upstreams if (key := up.api_key())}
        self._timeouts = {
            up.name: aiohttp.ClientTimeout(total=up.timeout.total, sock_connect=up.timeout.connect,
                                           sock_read=up.timeout.read)
            for up in router.upstreams
        }

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                             skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def upstream_headers(self, up: UpstreamConfig, client: Mapping[bytes, bytes]) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        auth = self._auth.get(up.name)
        if auth:
            headers["Authorization"] = auth
        elif b"authorization" in client:
            headers["Authorization"] = _header_value(client[b"authorization"])
        for name in _FORWARD_REQUEST:
            if name in client:
                headers[name.decode()] = _header_value(client[name])
        return headers

    async def handle(self, ep: Endpoint, body: bytes, client_headers: Mapping[bytes, bytes],
                     request_id: str, send: Send, receive: Receive) -> None:
        """Serve one API call; raises a TokenboothError before the response starts on failure."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequest("We could not parse the JSON body of your request.") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", "model")
        if ep.required not in payload:
            raise InvalidRequest(f"Missing required parameter: '{ep.required}'.", ep.required)
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", "stream")
        up = self.router.route(model)
        session_id = client_headers.get(b"x-tokenbooth-session")
        assert self.session is not None, "Proxy.start() was not awaited"

        call = _Call()
        started_at = time.time()
        t0 = time.perf_counter()
        in_flight = self.meter.in_flight(up.provider, model)
        in_flight.inc()
        try:
            await self._forward(up, ep, body, client_headers, request_id, stream, call, t0, send, receive)
        except UpstreamError as exc:
            call.error_type = exc.error_type
            if isinstance(exc, UpstreamStatusError):
                call.status = exc.status_code
            raise
        finally:
            in_flight.dec()
            duration = time.perf_counter() - t0
            usage = call.usage or NO_USAGE
            cost = self.prices.cost(model, usage, provider=up.provider, upstream=up.name,
                                    served_model=call.served_model, at=started_at)
            self.meter.record(CallRecord(
                request_id=request_id,
                started_at=started_at,
                provider=up.provider,
                upstream=up.name,
                model=model,
                operation=ep.operation,
                outcome=call.outcome,
                duration_s=duration,
                served_model=call.served_model,
                error_type=call.error_type,
                http_status=call.status,
                streamed=stream,
                usage=usage,
                cost=cost,
                ttft_s=call.ttft,
                session_id=session_id.decode("latin-1")[:128] if session_id else None,
            ))

    async def _forward(self, up: UpstreamConfig, ep: Endpoint, body: bytes,
                       client_headers: Mapping[bytes, bytes], request_id: str, stream: bool,
                       call: _Call, t0: float, send: Send, receive: Receive) -> None:
        assert self.session is not None
        try:
            resp = await self.session.post(up.base_url + ep.upstream_path, data=body,
                                           headers=self.upstream_headers(up, client_headers),
                                           timeout=self._timeouts[up.name])
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate_client_error(exc, up.name) from exc
        try:
            call.status = resp.status
            content_type = resp.headers.get("Content-Type", "application/json")
            if stream and resp.status == 200 and content_type.startswith("text/event-stream"):
                await self._stream(up, resp, request_id, call, t0, send, receive)
                return
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise translate_client_error(exc, up.name) from exc
            if resp.status >= 400:
                raise UpstreamStatusError(resp.status, data, content_type, up.name)
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamInvalidResponse(
                    f"upstream '{up.name}' answered {resp.status} with a body that is not JSON", up.name
                ) from None
            if not isinstance(parsed, dict):
                raise UpstreamInvalidResponse(f"upstream '{up.name}' answered with an unexpected body",
                                              up.name)
            call.usage = usage_from_openai(parsed.get("usage"))
            served = parsed.get("model")
            call.served_model = served if isinstance(served, str) else None
            call.outcome = Outcome.SUCCESS
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": self._response_headers(resp, request_id, content_type)})
            await send({"type": "http.response.body", "body": data, "more_body": False})
        finally:
            resp.release()

    def _response_headers(self, resp: aiohttp.ClientResponse, request_id: str,
                          content_type: str) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type.encode("latin-1")), (b"x-request-id", request_id.encode())]
        for name, value in resp.headers.items():
            lowered = name.lower()
            if lowered in _FORWARD_RESPONSE:
                headers.append((lowered.encode(), value.encode("latin-1")))
            elif lowered == "x-request-id":
                headers.append((b"x-upstream-request-id", value.encode("latin-1")))
        return headers

    async def _stream(self, up: UpstreamConfig, resp: aiohttp.ClientResponse, request_id: str,
                      call: _Call, t0: float, send: Send, receive: Receive) -> None:
        """Pass an SSE stream through chunk by chunk, metering it on the side."""
        meter = SSEMeter()
        task = asyncio.current_task()
        state = {"finished": False, "disconnected": False}

        def on_receive(fut: asyncio.Future[dict[str, Any]]) -> None:
            if state["finished"] or fut.cancelled() or fut.exception() is not None:
                return
            if fut.result().get("type") == "http.disconnect" and task is not None:
                state["disconnected"] = True
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._response_headers(resp, request_id, "text/event-stream")})
        try:
            try:
                async for chunk in resp.content.iter_any():
                    if meter.feed(chunk) and call.ttft is None:
                        call.ttft = time.perf_counter() - t0
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as exc:
                err = translate_client_error(exc, up.name)
                call.error_type = err.error_type
                log.warning("stream from %s broke off: %s", up.name, err.message)
                event = b"data: " + orjson.dumps(err.openai_body()) + b"\n\n"
                state["finished"] = True
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return
            state["finished"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            call.outcome = Outcome.SUCCESS if meter.error is None else Outcome.ERROR
            if meter.error is not None:
                call.error_type = ErrorType.SERVER_ERROR
        except asyncio.CancelledError:
            if not state["disconnected"] or task is None:
                raise
            task.uncancel()
            call.outcome = Outcome.CANCELLED
            call.error_type = ErrorType.CANCELLED
            resp.close()  # hang up on the upstream at once
        finally:
            state["finished"] = True
            watcher.cancel()
            call.usage = meter.usage
            call.served_model = meter.served_model
