"""A simulated OpenAI-compatible upstream, for the demo, the tests and the benchmarks.

Serves ``/v1/chat/completions`` (with SSE streaming), ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models`` with realistic usage numbers, a latency model
(time to first token, time per output token, log-normal jitter) and faults:

- by rate: ``SimConfig(faults={"429": 0.05, "500": 0.02, "timeout": 0.01})``;
- by script: ``POST /_sim/script`` with ``{"script": [{"status": 429, "retry_after": 2}, {}]}``
  makes the next calls take those actions in order (``{}`` is a normal answer;
  ``{"usage": {...}}`` fixes the usage reported).

Fault kinds: an HTTP status (``"429"``, ``"500"``, ``"503"``, ...), ``"timeout"`` (answer
only after ``timeout_s``), ``"reset"`` (drop the connection), ``"malformed"`` (a 200 with
a truncated JSON body), ``"break"`` (a stream that stops half way).
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

__all__ = ["SimConfig", "Simulator", "parse_faults"]

MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini", "deepseek-chat", "text-embedding-3-small")
_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "tokens", "flow", "through",
    "the", "gateway", "and", "every", "call", "is", "metered", "priced", "and", "written", "to", "the", "ledger",
)
_FAULT_KINDS = {"timeout", "reset", "malformed", "break"}


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


def _usage_tokens(text_len: int) -> int:
    return max(1, math.ceil(text_len / 4))


def _prompt_text(payload: dict[str, Any]) -> str:
    if "messages" in payload and isinstance(payload["messages"], list):
        parts = []
        for m in payload["messages"]:
            if isinstance(m, dict):
                c = m.get("content")
                parts.append(c if isinstance(c, str) else orjson.dumps(c).decode())
        return " ".join(parts)
    for key in ("prompt", "input"):
        v = payload.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            return " ".join(x if isinstance(x, str) else " " * 4 * len(x) for x in v)
    return ""


class Simulator:
    """The simulated upstream as an aiohttp application. ``await sim.start()`` serves it."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.script: deque[dict[str, Any]] = deque()
        self.stats: Counter[str] = Counter()
        self.open_streams = 0
        self.client_disconnects = 0
        self.app = web.Application()
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.models),
            web.post("/_sim/script", self.set_script),
            web.get("/_sim/stats", self.get_stats),
            web.post("/_sim/reset", self.reset),
        ])
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0 picks a free port); returns the port."""
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

    async def _fault(self, request: web.Request, action: dict[str, Any]) -> web.StreamResponse | None:
        status = action.get("status")
        if status:
            headers = {}
            if status == 429:
                headers["Retry-After"] = str(action.get("retry_after", self.config.retry_after))
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            body = {"error": {"message": action.get("message", f"simulated {status}"), "type": kind,
                              "param": None, "code": action.get("code", kind)}}
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

    def _usage(self, payload: dict[str, Any], action: dict[str, Any], completion: int) -> dict[str, Any]:
        fixed = action.get("usage")
        if isinstance(fixed, dict):
            return fixed
        prompt = _usage_tokens(len(_prompt_text(payload))) + 3 * len(payload.get("messages") or ())
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        cached = (prompt // 2) // 128 * 128 if prompt >= 1024 else 0
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        model = str(payload.get("model", ""))
        reasoning = completion // 2 if model[:1] == "o" and model[1:2].isdigit() else 0
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    def _completion_tokens(self, payload: dict[str, Any], action: dict[str, Any]) -> int:
        fixed = action.get("usage")
        if isinstance(fixed, dict) and isinstance(fixed.get("completion_tokens"), int):
            return max(1, int(fixed["completion_tokens"]))
        limit = payload.get("max_tokens") or payload.get("max_completion_tokens")
        lo, hi = self.config.output_tokens
        n = self.rng.randint(lo, hi)
        return min(n, limit) if isinstance(limit, int) and limit > 0 else n

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.stats[request.path] += 1
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "invalid JSON", "type": "invalid_request_error"}},
                                     status=400)
        action = self._action()
        faulted = await self._fault(request, action)
        if faulted is not None:
            return faulted
        model = payload.get("model", "gpt-4o-mini")
        n = self._completion_tokens(payload, action)
        usage = self._usage(payload, action, n)
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-sim{self.rng.getrandbits(48):012x}"
        if payload.get("stream"):
            return await self._stream(request, payload, action, chat, rid, created, model, n, usage)
        delay = self._delay(self.config.ttft_ms)
        delay += sum(self._delay(self.config.token_ms) for _ in range(n - 1))
        if delay:
            await asyncio.sleep(delay)
        text = " ".join(_WORDS[i % len(_WORDS)] for i in range(n))
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop", "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "usage": usage}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"x-request-id": rid})

    async def _stream(self, request: web.Request, payload: dict[str, Any], action: dict[str, Any],
                      chat: bool, rid: str, created: int, model: str, n: int,
                      usage: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-request-id": rid})
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        stop_at = n // 2 if action.get("fault") == "break" else None

        def chunk(choices: list[dict[str, Any]], with_usage: Any = None) -> bytes:
            event: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                     "choices": choices}
            if include_usage:
                event["usage"] = with_usage
            return b"data: " + orjson.dumps(event) + b"\n\n"

        self.open_streams += 1
        try:
            await resp.prepare(request)
            await asyncio.sleep(self._delay(self.config.ttft_ms))
            if chat:
                await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]))
            for i in range(n):
                if i:
                    delay = self._delay(self.config.token_ms)
                    if delay:
                        await asyncio.sleep(delay)
                if stop_at is not None and i == stop_at:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                word = ("" if i == 0 else " ") + _WORDS[i % len(_WORDS)]
                piece = {"index": 0, "delta": {"content": word}, "finish_reason": None} if chat else \
                    {"index": 0, "text": word, "finish_reason": None}
                await resp.write(chunk([piece]))
            end = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else \
                {"index": 0, "text": "", "finish_reason": "stop"}
            await resp.write(chunk([end]))
            if include_usage:
                await resp.write(chunk([], usage))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client hung up: that is its right
            self.client_disconnects += 1
        finally:
            self.open_streams -= 1
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

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
        tokens = sum(_usage_tokens(len(x)) if isinstance(x, str) else len(x or ()) for x in items)
        usage = fixed if isinstance(fixed, dict) else {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": payload.get("model"), "usage": usage}
        return web.Response(body=orjson.dumps(body), content_type="application/json")
