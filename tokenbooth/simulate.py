"""A simulated OpenAI-compatible upstream, for the demo, the tests and the benchmarks.

Serves ``/v1/chat/completions`` and ``/v1/completions`` (with SSE streaming),
``/v1/messages`` (Anthropic, streaming too), ``/v1/embeddings`` and ``/v1/models`` with
realistic usage numbers, a latency model (time to first token, time per output token, log-normal jitter) and faults:

- by rate: ``SimConfig(faults={"429": 0.05, "500": 0.02, "timeout": 0.01})``;
- by script: ``POST /_sim/script`` with ``{"script": [{"status": 429, "retry_after": 2}, {}]}``
  makes the next calls take those actions in order (``{}`` is a normal answer;
  ``{"usage": {...}}`` fixes the usage reported).

Fault kinds: an HTTP status (``"429"``, ``"500"``, ``"503"``, ...), ``"timeout"`` (answer
only after ``timeout_s``), ``"reset"`` (drop the connection), ``"malformed"`` (a 200 with
a truncated JSON body), ``"break"`` (a stream whose connection drops half way),
``"truncate"`` (a stream that ends cleanly half way, with no final event).
``POST /_sim/faults`` with ``{"faults": "500=1"}`` changes the fault rates while running.
``GET /_sim/stats`` counts the calls received; ``POST /_sim/reset`` clears counts and script.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tokenbooth.tokens import TokenEstimator

__all__ = ["SimConfig", "Simulator", "parse_faults"]

MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini", "deepseek-chat", "text-embedding-3-small")
_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "tokens", "flow", "through",
    "the", "gateway", "and", "every", "call", "is", "metered", "priced", "and", "written", "to", "the", "ledger",
)
_FAULT_KINDS = {"timeout", "reset", "malformed", "break", "truncate"}


def parse_faults(spec: str) -> dict[str, float]:
    """Parse ``"429=0.05,500=0.02,timeout=0.01"`` into fault rates.

    >>> parse_faults("429=0.05,timeout=0.01")
    {'429': 0.05, 'timeout': 0.01}
    """
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, rate = part.partition("=")
        if not (kind.isdigit() and 400 <= int(kind) <= 599) and kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: use an HTTP status 400-599 or one of "
                             f"{', '.join(sorted(_FAULT_KINDS))}")
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f"fault rate for {kind!r} is {rate!r}, not a number") from None
        if not 0 <= value <= 1:
            raise ValueError(f"fault rate for {kind!r} must be between 0 and 1")
        rates[kind] = value
    if sum(rates.values()) > 1:
        raise ValueError("fault rates add up to more than 1")
    return rates


@dataclass
class SimConfig:
    """Latency model and fault rates of the simulated upstream."""

    ttft_ms: float = 0.0  # median time to first token
    token_ms: float = 0.0  # median time per output token (streams; non-streamed calls wait in total)
    jitter: float = 0.0  # sigma of the log-normal factor applied to each delay
    output_tokens: tuple[int, int] = (16, 64)  # range when the request sets no max_tokens
    embedding_dim: int = 64
    faults: dict[str, float] = field(default_factory=dict)
    retry_after: float = 1.0  # Retry-After seconds sent with simulated 429s
    timeout_s: float = 30.0  # how long a "timeout" fault keeps the client waiting
    seed: int | None = None


class Simulator:
    """The simulated upstream as an aiohttp application. ``await sim.start()`` serves it."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.script: deque[dict[str, Any]] = deque()
        self.stats: Counter[str] = Counter()
        self.open_streams = 0
        self.client_disconnects = 0
        self.first_content_sent: list[float] = []  # perf_counter() when each stream's first content left
        self.queries: list[str] = []  # the query string of every API request, in order
        self.estimator = TokenEstimator()
        self.app = web.Application()
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/v1/messages", self.messages),
            web.post("/v1/responses", self.responses),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model_id}", self.model),
            web.post("/_sim/script", self.set_script),
            web.get("/_sim/stats", self.get_stats),
            web.post("/_sim/reset", self.reset),
            web.post("/_sim/faults", self.set_faults),
        ])
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0 picks a free port); returns the port."""
        self.estimator.warm()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- control -------------------------------------------------------------------------------
    async def set_script(self, request: web.Request) -> web.Response:
        body = await request.json()
        script = body.get("script") if isinstance(body, dict) else None
        if not isinstance(script, list) or not all(isinstance(s, dict) for s in script):
            return web.json_response({"error": "script must be a list of objects"}, status=400)
        self.script = deque(script)
        return web.json_response({"queued": len(self.script)})

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            self.config.faults = parse_faults(str(body.get("faults", "")) if isinstance(body, dict) else "")
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"faults": self.config.faults})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": dict(self.stats), "total": sum(self.stats.values()),
                                  "open_streams": self.open_streams,
                                  "client_disconnects": self.client_disconnects})

    async def reset(self, request: web.Request) -> web.Response:
        self.script.clear()
        self.stats.clear()
        return web.json_response({"ok": True})

    # -- API -----------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "simulate"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    def _action(self) -> dict[str, Any]:
        if self.script:
            return self.script.popleft()
        if self.config.faults:
            roll = self.rng.random()
            for kind, rate in self.config.faults.items():
                if roll < rate:
                    return {"fault": kind} if not kind.isdigit() else {"status": int(kind)}
                roll -= rate
        return {}

    def _delay(self, median_ms: float) -> float:
        if median_ms <= 0:
            return 0.0
        factor = math.exp(self.rng.gauss(0, self.config.jitter)) if self.config.jitter else 1.0
        return median_ms * factor / 1000

    async def _fault(self, request: web.Request, action: dict[str, Any], api: str = "openai"
                     ) -> web.StreamResponse | None:
        status = action.get("status")
        if status:
            headers = {}
            if status == 429:
                headers["Retry-After"] = str(action.get("retry_after", self.config.retry_after))
            message = action.get("message", f"simulated {status}")
            if api == "anthropic":
                kind = {429: "rate_limit_error", 529: "overloaded_error", 401: "authentication_error",
                        400: "invalid_request_error"}.get(status, "api_error")
                return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                                         status=status, headers=headers)
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": action.get("code", kind)}}
            return web.json_response(body, status=status, headers=headers)
        fault = action.get("fault")
        if fault == "timeout":
            await asyncio.sleep(action.get("seconds", self.config.timeout_s))
        elif fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("simulated reset")
        elif fault == "malformed":
            return web.Response(body=b'{"id": "chatcmpl-sim", "choices": [', content_type="application/json")
        return None

    def _words(self, payload: dict[str, Any], action: dict[str, Any]) -> list[str]:
        fixed = action.get("usage")
        n = None
        if isinstance(fixed, dict):
            n = fixed.get("completion_tokens", fixed.get("output_tokens"))
        if not isinstance(n, int) or n < 1:
            limit = next((payload[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                          if payload.get(k)), None)
            lo, hi = self.config.output_tokens
            n = self.rng.randint(lo, hi)
            if isinstance(limit, int) and limit > 0:
                n = min(n, limit)
        return [("" if i == 0 else " ") + _WORDS[i % len(_WORDS)] for i in range(n)]

    def _usage(self, payload: dict[str, Any], action: dict[str, Any], model: str, text: str,
               api: str) -> dict[str, Any]:
        """Usage as the real API would report it; counted with the gateway's own estimator,
        so an honest upstream reconciles. A scripted ``usage`` is reported as given."""
        fixed = action.get("usage")
        if isinstance(fixed, dict):
            return fixed
        prompt = self.estimator.prompt(model, payload)
        visible = self.estimator.count(model, text)
        cached = (prompt // 2) // 128 * 128 if prompt >= 1024 else 0
        if api == "anthropic":
            return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": cached, "output_tokens": visible}
        reasoning = visible // 2 if model[:1] == "o" and model[1:2].isdigit() else 0  # hidden, billed as output
        return {"prompt_tokens": prompt, "completion_tokens": visible + reasoning,
                "total_tokens": prompt + visible + reasoning,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    async def _generate(self, request: web.Request, api: str) -> web.StreamResponse:
        """chat / completions (OpenAI) or messages (Anthropic)."""
        self.stats[request.path] += 1
        self.queries.append(request.query_string)
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "invalid JSON", "type": "invalid_request_error"}},
                                     status=400)
        flavour = "anthropic" if api == "messages" else "openai"
        action = self._action()
        faulted = await self._fault(request, action, flavour)
        if faulted is not None:
            return faulted
        model = str(payload.get("model", "gpt-4o-mini"))
        words = self._words(payload, action)
        usage = self._usage(payload, action, model, "".join(words), flavour)
        if api == "responses" and not isinstance(action.get("usage"), dict):
            usage = _responses_usage(usage)
        if payload.get("stream"):
            return await self._stream(request, payload, action, api, model, words, usage)
        delay = self._delay(self.config.ttft_ms)
        delay += sum(self._delay(self.config.token_ms) for _ in range(len(words) - 1))
        if delay:
            await asyncio.sleep(delay)
        text = "".join(words)
        rid = self._id(api)
        created = int(time.time())
        body: dict[str, Any]
        if api == "messages":
            body = {"id": rid, "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": usage}
        elif api == "responses":
            body = _response_object(rid, created, model, text, usage, "completed")
        elif api == "chat":
            body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop", "logprobs": None}], "usage": usage}
        else:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": usage}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"x-request-id": rid})

    def _id(self, api: str) -> str:
        prefix = {"chat": "chatcmpl", "completions": "cmpl", "messages": "msg", "responses": "resp"}[api]
        return f"{prefix}-sim{self.rng.getrandbits(48):012x}"

    def _events(self, payload: dict[str, Any], api: str, model: str, words: list[str],
                usage: dict[str, Any]) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's events: before the content, one per word, after the content."""
        rid = self._id(api)
        if api == "messages":
            def ev(kind: str, data: dict[str, Any]) -> bytes:
                return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

            start_usage = {**{k: v for k, v in usage.items() if k != "output_tokens"}, "output_tokens": 1}
            head = [ev("message_start", {"message": {"id": rid, "type": "message", "role": "assistant",
                                                     "model": model, "content": [], "stop_reason": None,
                                                     "stop_sequence": None, "usage": start_usage}}),
                    ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                    ev("ping", {})]
            body = [ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
                    for w in words]
            tail = [ev("content_block_stop", {"index": 0}),
                    ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                         "usage": {"output_tokens": usage.get("output_tokens", len(words))}}),
                    ev("message_stop", {})]
            return head, body, tail
        if api == "responses":
            return _response_events(rid, int(time.time()), model, words, usage)
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())
        chat = api == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], with_usage: Any = None) -> bytes:
            event: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                     "choices": choices}
            if include_usage:
                event["usage"] = with_usage
            return b"data: " + orjson.dumps(event) + b"\n\n"

        head = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])] \
            if chat else []
        body = [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None} if chat else
                       {"index": 0, "text": w, "finish_reason": None}]) for w in words]
        tail = [chunk([{"index": 0, "delta": {}, "finish_reason": "stop"} if chat else
                       {"index": 0, "text": "", "finish_reason": "stop"}])]
        if include_usage:
            tail.append(chunk([], usage))
        tail.append(b"data: [DONE]\n\n")
        return head, body, tail

    async def _stream(self, request: web.Request, payload: dict[str, Any], action: dict[str, Any], api: str,
                      model: str, words: list[str], usage: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        head, body, tail = self._events(payload, api, model, words, usage)
        fault = action.get("fault")
        stop_at = len(body) // 2 if fault in ("break", "truncate") else None
        self.open_streams += 1
        try:
            await resp.prepare(request)
            for event in head:
                await resp.write(event)
            await asyncio.sleep(self._delay(self.config.ttft_ms))
            for i, event in enumerate(body):
                if i:
                    delay = self._delay(self.config.token_ms)
                    if delay:
                        await asyncio.sleep(delay)
                if stop_at is not None and i == stop_at:
                    if fault == "truncate":  # a clean end of the body, but not of the stream
                        await resp.write_eof()
                    elif request.transport is not None:
                        request.transport.abort()
                    return resp
                if i == 0:  # stamped before the write: the reader may see it before write() returns
                    self.first_content_sent.append(time.perf_counter())
                await resp.write(event)
            for event in tail:
                await resp.write(event)
            await resp.write_eof()
        except ConnectionResetError:  # the client hung up: that is its right
            self.client_disconnects += 1
        finally:
            self.open_streams -= 1
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "messages")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The OpenAI Responses API: plain, and streamed as ``event:`` / ``data:`` frames."""
        return await self._generate(request, "responses")

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's ``messages.count_tokens``: the prompt's tokens, nothing generated."""
        self.stats[request.path] += 1
        self.queries.append(request.query_string)
        payload = orjson.loads(await request.read())
        faulted = await self._fault(request, self._action(), "anthropic")
        if faulted is not None:
            return faulted
        tokens = self.estimator.prompt(str(payload.get("model", "")), payload)
        return web.json_response({"input_tokens": tokens})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id not in MODELS:
            return web.json_response({"error": {"message": f"The model '{model_id}' does not exist",
                                                "type": "invalid_request_error", "code": "model_not_found"}},
                                     status=404)
        return web.json_response({"id": model_id, "object": "model", "created": 1700000000, "owned_by": "simulate"})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.stats[request.path] += 1
        payload = orjson.loads(await request.read())
        action = self._action()
        faulted = await self._fault(request, action)
        if faulted is not None:
            return faulted
        inputs = payload.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        dim = int(payload.get("dimensions") or self.config.embedding_dim)
        data = [{"object": "embedding", "index": i, "embedding": [round(self.rng.uniform(-1, 1), 6)
                                                                    for _ in range(dim)]}
                for i in range(len(items))]
        fixed = action.get("usage")
        tokens = self.estimator.prompt(str(payload.get("model", "")), payload)
        usage = fixed if isinstance(fixed, dict) else {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": payload.get("model"), "usage": usage}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def _responses_usage(chat: dict[str, Any]) -> dict[str, Any]:
    """Chat-shaped usage as the Responses API reports it."""
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": chat["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": chat["total_tokens"]}


def _response_object(rid: str, created: int, model: str, text: str, usage: dict[str, Any] | None,
                     status: str) -> dict[str, Any]:
    message = {"type": "message", "id": "msg_" + rid[5:], "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    output = [message] if text or status == "completed" else []
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "error": None, "incomplete_details": None, "instructions": None,
            "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto", "tools": [],
            "top_p": 1.0}


def _response_events(rid: str, created: int, model: str, words: list[str],
                     usage: dict[str, Any]) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """A Responses API stream: created, one output_text.delta per word, completed with the usage."""
    seq = iter(range(10_000))
    item = "msg_" + rid[5:]

    def ev(kind: str, data: dict[str, Any]) -> bytes:
        return (b"event: " + kind.encode() + b"\ndata: "
                + orjson.dumps({"type": kind, "sequence_number": next(seq), **data}) + b"\n\n")

    text = "".join(words)
    head = [ev("response.created", {"response": _response_object(rid, created, model, "", None, "in_progress")}),
            ev("response.output_item.added", {"output_index": 0, "item": {"type": "message", "id": item,
                                                                          "status": "in_progress",
                                                                          "role": "assistant", "content": []}}),
            ev("response.content_part.added", {"item_id": item, "output_index": 0, "content_index": 0,
                                               "part": {"type": "output_text", "text": "", "annotations": []}})]
    body = [ev("response.output_text.delta", {"item_id": item, "output_index": 0, "content_index": 0, "delta": w})
            for w in words]
    tail = [ev("response.output_text.done", {"item_id": item, "output_index": 0, "content_index": 0, "text": text}),
            ev("response.completed", {"response": _response_object(rid, created, model, text, usage, "completed")})]
    return head, body, tail
