"""Every other ``/v1/`` path: forwarded as it is, streamed both ways, and metered.

Files, batches, audio, images, moderations, fine-tuning, vector stores, stored responses, and
whatever OpenAI adds next go to the upstream the body's ``model`` routes to, or else to the
pass-through upstream (``passthrough.upstream``, else the one that serves any model). Bodies
are not held: an upload goes upstream as the client sends it, a download back as it comes.
Only a JSON request body is read whole (up to ``passthrough.max_json_body``), to find its model,
and a JSON answer of up to ``_USAGE_BYTES`` is kept beside the stream, to find its usage.

Each call is one record under an ``operation`` named by the path's family. It is priced from
the usage it reports (image generation, transcription in tokens, ``responses/compact``);
moderations, token counts and reads of stored responses cost nothing; anything else is
unpriced (its cost is unknown, never $0).

A background response, recorded at no cost when it was queued, is charged by the first read
that sees it finished: a poll (``GET /v1/responses/{id}``) or a resumed stream (``?stream=true``).
A batch is charged by the first read that sees it finished with its ``usage``, at
``passthrough.batch_discount`` of the list price (the Batch API's 50 %, which genai-prices does
not apply); its create and other reads cost nothing. "First" is asked of Redis when budgets
share it, so one charge holds across replicas; else it is remembered per process. Every row of
a stored response or a batch carries its id (``response_id``), which links them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

import orjson

from tokenbooth.calls import CallState
from tokenbooth.config import PassthroughConfig, UpstreamConfig
from tokenbooth.control.controller import CLAIM_TTL, Controller, Demand, Ticket
from tokenbooth.control.keys import ClientKey
from tokenbooth.control.store import MemoryStore
from tokenbooth.errors import (
    ErrorType,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
    UpstreamError,
    classify_status,
)
from tokenbooth.gateway.proxy import ClientGone, HangupWatch, Proxy, Receive, Send, body_chunks
from tokenbooth.record import NO_USAGE, Operation, Outcome, TokenUsage
from tokenbooth.streams import ResponsesStream
from tokenbooth.tokens import usage_from_openai, usage_from_responses

__all__ = ["Passthrough", "family"]

_FAMILIES = {
    "responses": Operation.RESPONSES,
    "moderations": Operation.MODERATIONS,
    "audio": Operation.AUDIO,
    "images": Operation.IMAGES,
    "files": Operation.FILES,
    "uploads": Operation.FILES,
    "containers": Operation.FILES,
    "batches": Operation.BATCHES,
    "fine_tuning": Operation.FINE_TUNING,
    "vector_stores": Operation.VECTOR_STORES,
    "assistants": Operation.ASSISTANTS,
    "threads": Operation.ASSISTANTS,
}
# what costs nothing but what its answer charges (see Passthrough._usage): moderations; the reads,
# deletions and token counts of stored responses (compact is a generation of its own); a batch's
# create and reads (the first read that sees it finished charges it)
_FREE = frozenset({Operation.MODERATIONS, Operation.RESPONSES, Operation.BATCHES})
_COMPACT = "/v1/responses/compact"  # Codex's compaction: a generation of its own, priced by its usage
_TERMINAL = ("completed", "incomplete", "failed", "cancelled")
_BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
_RESPONSE = re.compile(r"^/v1/responses/([^/]+)$")  # GET: one stored response, as a poll reads it
_STORED = re.compile(r"^/v1/(?:responses|batches)/([^/]+)")  # a stored response's or a batch's own paths
_NOT_IDS = frozenset({"compact", "input_tokens"})
_USAGE_BYTES = 1 << 20  # a JSON answer up to this size is kept to read its usage
# hop-by-hop headers, and what no longer holds once the gateway has decoded the body
_DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                            b"content-encoding", b"x-request-id", b"proxy-authenticate", b"upgrade", b"trailer"})
_DROP_REQUEST = frozenset({b"content-type", b"accept-encoding"})


def family(path: str) -> Operation:
    """The ``operation`` of a passed-through path: its family, or ``other``.

    >>> family("/v1/files/file-abc/content"), family("/v1/something_new")
    (<Operation.FILES: 'files'>, <Operation.OTHER: 'other'>)
    """
    return _FAMILIES.get(path[4:].split("/", 1)[0], Operation.OTHER)


async def _read_json(receive: Receive, limit: int) -> bytes:
    too_large = InvalidRequest(f"The JSON body is larger than this gateway reads ({limit} bytes; "
                               "passthrough.max_json_body).")
    return b"".join([chunk async for chunk in body_chunks(receive, limit, too_large)])


class Passthrough:
    """Forwards the ``/v1/`` paths the gateway has no endpoint of its own for (see the module)."""

    def __init__(self, proxy: Proxy, config: PassthroughConfig, max_upload: int = 1 << 30) -> None:
        self.proxy = proxy
        self.config = config
        self.max_upload = max_upload
        router = proxy.router
        named = next((u for u in router.upstreams if u.name == config.upstream), None)
        # who charges a finished background response or batch: the first to claim it
        self._claims: Controller | MemoryStore = proxy.control if proxy.control is not None else MemoryStore()
        self.default: UpstreamConfig | None = named or router.wildcard or \
            (router.upstreams[0] if router.upstreams else None)

    def _upstream(self, model: str) -> UpstreamConfig:
        if model:
            try:
                return self.proxy.router.targets(model)[0][0]
            except ModelNotFound:
                pass
        if self.default is None:
            raise NotFound("No upstream is configured for this path: set passthrough.upstream.")
        return self.default

    async def handle(self, method: str, path: str, query: bytes, headers: Mapping[bytes, bytes], request_id: str,
                     send: Send, receive: Receive, arrived: float, key: ClientKey | None) -> None:
        """Forward one call and record it; raises a TokenboothError before the response starts on failure."""
        op = family(path)
        content_type = headers.get(b"content-type", b"")
        length_header = headers.get(b"content-length")
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            raise InvalidRequest("The Content-Length header is not a number.") from None
        if length is not None and length > self.max_upload:
            raise RequestTooLarge(self.max_upload, "upload")
        has_body = length != 0 and (length is not None or b"transfer-encoding" in headers)
        body, stream, model = b"", None, ""
        if has_body and content_type.split(b";")[0].strip() == b"application/json" \
                and (length or 0) <= self.config.max_json_body:
            try:
                body = await _read_json(receive, self.config.max_json_body)
            except ClientGone:
                return  # gone before its call was made: nothing went upstream, nothing to record
            length = len(body)
            try:
                found = orjson.loads(body).get("model")
                model = found if isinstance(found, str) else ""
            except (orjson.JSONDecodeError, AttributeError):
                pass  # forwarded as it is: the upstream says what is wrong with it
        elif has_body:
            stream = body_chunks(receive, self.max_upload, RequestTooLarge(self.max_upload, "upload"))
        up = self._upstream(model)
        proxy = self.proxy
        ticket: Ticket | None = None
        if proxy.control is not None and key is not None:
            checks = proxy.control.plan(key)
            ticket = await proxy.control.admit(checks, Demand(0, None) if proxy.control.needs_demand(checks) else None)

        call = CallState(up.provider, up.name, model)
        call.attempts = 1
        started_at = time.time()
        in_flight = proxy.meter.in_flight(up.provider, model)
        in_flight.inc()
        if proxy.journal is not None:
            proxy.journal.begin()
        watch: HangupWatch | None = None if stream is not None else HangupWatch(receive)
        try:
            upstream_headers = [h for h in proxy.request_headers(up, headers) if h[0] not in _DROP_REQUEST]
            if content_type:
                upstream_headers.append((b"content-type", content_type))
            accept = headers.get(b"accept")
            if accept is not None:
                upstream_headers.append((b"accept", accept))
            target = path[3:].encode() + (b"?" + query if query else b"")
            resp = await proxy.pools[up.name].request(target, body, upstream_headers, method=method.encode(),
                                                      stream=stream, length=length)
            if watch is None:
                watch = HangupWatch(receive)
            await self._answer(resp, call, op, path, request_id, send, watch)
        except UpstreamError as exc:
            call.error_type = exc.error_type
            call.status = exc.status_code
            raise
        except (ClientGone, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and (watch is None or not watch.take()):
                raise
            # the client hung up (during its upload, or before the answer was whole): the
            # upstream connection is closed already
            call.outcome = Outcome.CANCELLED
            call.error_type = ErrorType.CANCELLED
        finally:
            if watch is not None:
                watch.close()
            proxy.conclude(call, ticket, in_flight, key, request_id=request_id, operation=op,
                           model=model or call.target_model, payload={}, started_at=started_at,
                           duration=time.perf_counter() - arrived, streamed=False)

    async def _answer(self, resp: Any, call: CallState, op: Operation, path: str, request_id: str, send: Send,
                      watch: HangupWatch) -> None:
        """Stream the upstream's answer back, keeping a small JSON one to read its usage."""
        try:
            call.status = resp.status
            out = [(b"x-request-id", request_id.encode())]
            for name, value in resp.headers:
                if name == b"x-request-id":
                    out.append((b"x-upstream-request-id", value))
                elif name not in _DROP_RESPONSE:
                    out.append((name, value))
            content_type = resp.header(b"content-type") or ""
            kept: list[bytes] | None = [] if content_type.startswith("application/json") else None
            # a stored response's events, resumed (?stream=true): the terminal one has its usage
            follower = ResponsesStream() if op is Operation.RESPONSES and resp.status < 400 \
                and content_type.startswith("text/event-stream") else None
            size = 0
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            if resp.status >= 400:  # an error answer is small: read whole, so no upstream key it quotes gets out
                body = self.proxy.redact(await resp.read())
                if kept is not None:
                    kept.append(body)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            async for chunk in resp:
                if kept is not None:
                    size += len(chunk)
                    if size <= _USAGE_BYTES:
                        kept.append(chunk)
                    else:
                        kept = None
                elif follower is not None:
                    follower.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watch.done()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            resp.release()
        if resp.status >= 400:
            call.error_type = classify_status(resp.status)
            call.reported = NO_USAGE
            return
        call.outcome = Outcome.SUCCESS
        parsed: Any = None
        if kept:
            try:
                parsed = orjson.loads(b"".join(kept))
            except orjson.JSONDecodeError:
                parsed = None
        if not isinstance(parsed, dict):
            parsed = {}
        served = parsed.get("model") if follower is None else follower.served_model
        call.served_model = served if isinstance(served, str) else None
        if not call.target_model and call.served_model:  # a GET names no model: price by the answer's
            call.target_model = call.served_model
        stored = _STORED.match(path)
        if stored is not None and stored[1] not in _NOT_IDS:
            call.response_id = stored[1]
        elif op in (Operation.RESPONSES, Operation.BATCHES) and isinstance(parsed.get("id"), str):
            call.response_id = parsed["id"]
        usage = await self._usage(op, path, parsed, follower, call)
        call.reported = usage or NO_USAGE
        call.unpriced = call.unpriced or (usage is None and op not in _FREE)

    async def _usage(self, op: Operation, path: str, parsed: dict[str, Any], follower: ResponsesStream | None,
                     call: CallState) -> TokenUsage | None:
        """What the call is charged for: the usage its answer reports, if it is a generation of
        its own or the first read of a finished background response or batch; else None."""
        if op is Operation.BATCHES:
            raw = parsed.get("usage")
            if parsed.get("object") != "batch" or parsed.get("status") not in _BATCH_TERMINAL or \
                    not await self._claims.claim(f"batch:{parsed.get('id')}", CLAIM_TTL):
                return None
            call.rate = self.config.batch_discount
            if not isinstance(raw, dict):  # finished, but its cost is not told: unknown, never $0
                call.unpriced = True
                return None
            return usage_from_responses(raw)
        if op is Operation.RESPONSES and path != _COMPACT:
            poll = _RESPONSE.match(path)
            if poll is None:
                return None  # input items, deletion, cancellation, a token count: no generation
            if follower is not None:  # a resumed stream: done when its terminal event came
                done, background, usage = follower.finished, follower.background, follower.usage
            else:
                done, background = parsed.get("status") in _TERMINAL, parsed.get("background") is True
                usage = usage_from_responses(parsed.get("usage")) if isinstance(parsed.get("usage"), dict) else None
            if not (done and background and await self._claims.claim(f"response:{poll[1]}", CLAIM_TTL)):
                return None  # a stored response read again: its usage was its own call's, charged then
            return usage
        raw = parsed.get("usage")
        if not isinstance(raw, dict):
            return None
        return usage_from_responses(raw) if "input_tokens" in raw else usage_from_openai(raw)
