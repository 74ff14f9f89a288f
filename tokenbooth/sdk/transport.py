"""Metering at the HTTP transport of the official clients.

``openai`` and ``anthropic`` clients send every request through an httpx (or httpx2)
transport. Wrapping that transport meters each API call the way the gateway does (same
endpoints, same stream followers, same recorder) whatever client method made it:
``create``, ``stream`` helpers, raw responses. The client's own behaviour, return values
and exceptions are untouched; a failure of the metering itself is logged, never raised.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from typing import Any

import orjson

from tokenbooth.calls import ENDPOINTS, CallState, Endpoint, follower_for
from tokenbooth.errors import ErrorType, classify_status
from tokenbooth.record import Outcome
from tokenbooth.sdk.agent import AgentSession, current_session
from tokenbooth.sdk.runtime import Runtime
from tokenbooth.streams import StreamFollower

__all__ = ["MeteringTransport", "classify_transport_error"]

log = logging.getLogger("tokenbooth.sdk")

_SUFFIXES = [(ep.upstream_path, ep) for ep in ENDPOINTS.values()]
_ids = itertools.count(1)
_ID_PREFIX = "sdk-" + os.urandom(5).hex()


def classify_transport_error(exc: BaseException) -> ErrorType:
    """The error type of an httpx/httpx2 exception, by its class (the same in both libraries)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "ConnectTimeout" in names:
        return ErrorType.TIMEOUT_CONNECT
    if "TimeoutException" in names:
        return ErrorType.TIMEOUT_READ
    if "RemoteProtocolError" in names or "DecodingError" in names:
        return ErrorType.INVALID_RESPONSE
    return ErrorType.CONNECTION


def _endpoint(path: str) -> Endpoint | None:
    for suffix, ep in _SUFFIXES:
        if path.endswith(suffix):
            return ep
    return None


class Exchange:
    """One metered API call: started when the request goes out, recorded exactly once."""

    __slots__ = ("call", "done", "ep", "follower", "in_flight", "model", "parts", "payload", "request_id",
                 "runtime", "session", "started_at", "streamed", "t0", "tenant")

    def __init__(self, runtime: Runtime, ep: Endpoint, provider: str, upstream: str, model: str,
                 payload: dict[str, Any], tenant: str | None) -> None:
        self.t0 = time.perf_counter()
        self.started_at = time.time()
        self.runtime = runtime
        self.ep = ep
        self.model = model
        self.payload = payload
        self.streamed = payload.get("stream") is True
        self.tenant = tenant
        self.session: AgentSession | None = current_session()
        self.call = CallState(provider, upstream, model)
        self.call.attempts = 1
        self.follower: StreamFollower | None = None
        self.parts: list[bytes] = []
        self.done = False
        self.request_id = f"{_ID_PREFIX}{next(_ids):x}"
        self.in_flight = runtime.meter.in_flight(provider, model)
        self.in_flight.inc()

    def response(self, status: int, headers: Any) -> None:
        try:
            self.call.status = status
            rid = headers.get("x-request-id") or headers.get("request-id")
            if rid:
                self.request_id = str(rid)[:64]
            content_type = headers.get("content-type", "")
            if self.streamed and status == 200 and content_type.startswith("text/event-stream"):
                self.follower = follower_for(self.ep)
        except Exception:
            log.exception("metering a response failed")

    def chunk(self, data: bytes) -> None:
        try:
            follower = self.follower
            if follower is None:
                self.parts.append(data)
                return
            seen = follower.content_chunks
            follower.feed(data)
            if follower.content_chunks != seen:
                now = time.perf_counter() - self.t0
                if self.call.ttft is None:
                    self.call.ttft = now
                self.call.last_token = now
        except Exception:
            log.exception("metering a chunk failed")

    def end(self) -> None:
        """The response body was read to its end."""
        if self.done:
            return
        try:
            call = self.call
            follower = self.follower
            if follower is not None:
                call.take_stream(follower)
                if follower.error is not None:
                    call.error_type = ErrorType.SERVER_ERROR
                elif follower.finished:
                    call.outcome = Outcome.SUCCESS
                else:
                    call.error_type = ErrorType.INVALID_RESPONSE
            else:
                body = b"".join(self.parts)
                status = call.status or 0
                if status >= 400:
                    call.error_type = classify_status(status, body)
                else:
                    try:
                        parsed = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        parsed = None
                    if isinstance(parsed, dict):
                        call.read_response(parsed, self.ep)
                    else:
                        call.error_type = ErrorType.INVALID_RESPONSE
        except Exception:
            log.exception("metering a response body failed")
        self.finish()

    def cancel(self) -> None:
        """The response was closed before its end: the caller stopped reading."""
        if self.done:
            return
        if self.follower is not None and self.follower.finished:
            self.end()  # clients stop reading at the final event; the stream was complete
            return
        if self.follower is not None:
            self.call.take_stream(self.follower)
        self.call.outcome = Outcome.CANCELLED
        self.call.error_type = ErrorType.CANCELLED
        self.finish()

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.call.error_type = classify_transport_error(exc)
        if self.follower is not None:
            self.call.take_stream(self.follower)
        self.finish()

    def finish(self) -> None:
        self.done = True
        try:
            self.in_flight.dec()
            session = self.session
            record = self.runtime.recorder.finish(
                self.call, request_id=self.request_id, operation=self.ep.operation, model=self.model,
                payload=self.payload, started_at=self.started_at, duration=time.perf_counter() - self.t0,
                streamed=self.streamed, session_id=session.session_id if session else None, tenant=self.tenant)
            if session is not None:
                session.add_call(record)
        except Exception:
            log.exception("recording a call failed")


def _already_read(response: Any, exchange: Exchange) -> bool:
    """A transport may hand back a response whose body is already in memory (test transports,
    caches): meter it now, since nothing will read its stream."""
    content = response.__dict__.get("_content")
    if content is None:
        return False
    exchange.chunk(content)
    exchange.end()
    return True


_stream_classes: dict[str, tuple[type, type]] = {}


def _observed_streams(lib: Any) -> tuple[type, type]:
    """Response-stream wrappers deriving from this library's SyncByteStream / AsyncByteStream."""
    hit = _stream_classes.get(lib.__name__)
    if hit is not None:
        return hit

    class SyncObserved(lib.SyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, exchange: Exchange) -> None:
            self._inner = inner
            self._exchange = exchange

        def __iter__(self) -> Any:
            try:
                for chunk in self._inner:
                    self._exchange.chunk(chunk)
                    yield chunk
            except Exception as exc:
                self._exchange.fail(exc)
                raise
            self._exchange.end()

        def close(self) -> None:
            self._exchange.cancel()
            self._inner.close()

    class AsyncObserved(lib.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, exchange: Exchange) -> None:
            self._inner = inner
            self._exchange = exchange

        async def __aiter__(self) -> Any:
            try:
                async for chunk in self._inner:
                    self._exchange.chunk(chunk)
                    yield chunk
            except Exception as exc:
                self._exchange.fail(exc)
                raise
            self._exchange.end()

        async def aclose(self) -> None:
            self._exchange.cancel()
            await self._inner.aclose()

    _stream_classes[lib.__name__] = (SyncObserved, AsyncObserved)
    return SyncObserved, AsyncObserved


class MeteringTransport:
    """Wraps an httpx/httpx2 transport (sync or async) and meters the API calls through it."""

    def __init__(self, inner: Any, runtime: Runtime, provider: str, tenant: str | None) -> None:
        self._inner = inner
        self._runtime = runtime
        self._provider = provider
        self._tenant = tenant
        lib = sys.modules[type(inner).__module__.split(".")[0]]
        self._sync_stream, self._async_stream = _observed_streams(lib)

    def _begin(self, request: Any) -> Exchange | None:
        try:
            if request.method != "POST":
                return None
            ep = _endpoint(request.url.path)
            if ep is None:
                return None
            payload = orjson.loads(request.content)
            model = payload.get("model") if isinstance(payload, dict) else None
            if not isinstance(model, str):
                return None
            return Exchange(self._runtime, ep, self._provider, request.url.host, model, payload, self._tenant)
        except Exception:  # not a JSON API call we meter, or metering failed: pass it through
            return None

    def handle_request(self, request: Any) -> Any:
        exchange = self._begin(request)
        if exchange is None:
            return self._inner.handle_request(request)
        try:
            response = self._inner.handle_request(request)
        except Exception as exc:
            exchange.fail(exc)
            raise
        return self._observe(response, exchange, self._sync_stream)

    async def handle_async_request(self, request: Any) -> Any:
        exchange = self._begin(request)
        if exchange is None:
            return await self._inner.handle_async_request(request)
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            exchange.fail(exc)
            raise
        return self._observe(response, exchange, self._async_stream)

    @staticmethod
    def _observe(response: Any, exchange: Exchange, stream_class: type) -> Any:
        """Meter the response: its body now if already read, else as the caller reads its stream."""
        exchange.response(response.status_code, response.headers)
        if not _already_read(response, exchange):
            response.stream = stream_class(response.stream, exchange)
        return response

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __enter__(self) -> MeteringTransport:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.__exit__(*exc)

    async def __aenter__(self) -> MeteringTransport:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
