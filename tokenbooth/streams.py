"""Following server-sent-event streams to meter them while they pass through.

The bytes go to the client as they arrive. A follower reads them on the side: first and
last content, the model served, the usage reported, the text streamed (for an estimate
when no usage comes), whether the stream finished properly.

One exception to "untouched": when the gateway itself asked an OpenAI upstream for usage
(``stream_options.include_usage``) on behalf of a client that did not, it removes what that
request added (the usage-only final chunk, and ``"usage": null`` in the other chunks), so the
client sees what it would have seen without the gateway. It then forwards whole events.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from tokenbooth.record import TokenUsage
from tokenbooth.tokens import usage_from_anthropic, usage_from_openai, usage_from_responses

__all__ = ["AnthropicStream", "OpenAIStream", "ResponsesStream", "StreamFollower"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')


class StreamFollower:
    """What every follower tracks; subclasses read their provider's events."""

    __slots__ = ("_buf", "content_chunks", "error", "finished", "served_model", "text", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.content_chunks = 0
        self.usage: TokenUsage | None = None
        self.served_model: str | None = None
        self.finished = False  # the stream ended the way its API says a complete stream ends
        self.error: Any = None  # an error event from the upstream
        self.text: list[str] = []

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes from upstream; return the bytes to send to the client."""
        data = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            if line.startswith(b"data:"):
                self._data(line[5:].strip())
        self._buf = data[start:]
        return chunk

    def _data(self, payload: bytes) -> dict[str, Any] | None:
        raise NotImplementedError

    @staticmethod
    def _json(payload: bytes) -> dict[str, Any] | None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        return event if isinstance(event, dict) else None


class OpenAIStream(StreamFollower):
    """Follows OpenAI chat and text-completion chunks."""

    __slots__ = ("strip_usage",)

    def __init__(self, strip_usage: bool = False) -> None:
        super().__init__()
        self.strip_usage = strip_usage

    def feed(self, chunk: bytes) -> bytes:
        if not self.strip_usage:
            return super().feed(chunk)
        data = self._buf + chunk if self._buf else chunk
        out = []
        start = 0
        crlf = b"\r" in data  # bytes.find is several times faster than the regex, when it can serve
        while True:
            if crlf:
                m = _EVENT_END.search(data, start)
                end = -1 if m is None else m.end()
            else:
                end = data.find(b"\n\n", start)
                end = -1 if end < 0 else end + 2
            if end < 0:
                break
            kept = self._event(data[start:end])
            start = end
            if kept is not None:
                out.append(kept)
        self._buf = data[start:]
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        """One whole event in strip mode: meter it, drop it or clean it."""
        drop = False
        for line in event.splitlines():
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                parsed = self._data(payload)
                if parsed is not None and not parsed.get("choices") and parsed.get("usage"):
                    drop = True  # the usage-only chunk the client did not ask for
        if drop:
            return None
        if b'"usage"' not in event:
            return event
        event = event.replace(b',"usage":null', b"")  # OpenAI's compact JSON; the regex for the rest
        return _USAGE_NULL.sub(b"", event) if b'"usage"' in event else event

    def _data(self, payload: bytes) -> dict[str, Any] | None:
        if payload == b"[DONE]":
            self.finished = True
            return None
        event = self._json(payload)
        if event is None:
            return None
        if "error" in event:
            self.error = event["error"]
            return event
        if self.served_model is None and isinstance(event.get("model"), str):
            self.served_model = event["model"]
        usage = event.get("usage")
        if usage:
            self.usage = usage_from_openai(usage)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content") or delta.get("reasoning_content") or ""
                if delta.get("tool_calls"):
                    text += orjson.dumps(delta["tool_calls"]).decode()
            else:
                text = choice.get("text") or ""
            if text:
                self.content_chunks += 1
                self.text.append(text)
            if choice.get("finish_reason"):
                self.finished = True
        return event


class AnthropicStream(StreamFollower):
    """Follows Anthropic Messages events: message_start, content_block_delta, message_delta, ..."""

    __slots__ = ("_start_usage",)

    def __init__(self) -> None:
        super().__init__()
        self._start_usage: dict[str, Any] = {}

    def _data(self, payload: bytes) -> dict[str, Any] | None:
        event = self._json(payload)
        if event is None:
            return None
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = delta.get("text") or delta.get("thinking") or delta.get("partial_json") or ""
            if text:
                self.content_chunks += 1
                self.text.append(text)
        elif kind == "message_start":
            message = event.get("message") or {}
            if isinstance(message.get("model"), str):
                self.served_model = message["model"]
            self._start_usage = dict(message.get("usage") or {})
            self.usage = usage_from_anthropic(self._start_usage)
        elif kind == "message_delta":
            # output_tokens here is cumulative; newer API versions repeat the input counts too
            merged = {**self._start_usage, **{k: v for k, v in (event.get("usage") or {}).items()
                                               if v is not None}}
            self.usage = usage_from_anthropic(merged)
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error = event.get("error")
        return event


_RESPONSES_TEXT = frozenset({"response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
                             "response.reasoning_summary_text.delta", "response.function_call_arguments.delta"})
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesStream(StreamFollower):
    """Follows the OpenAI Responses API's events (``event:`` / ``data:`` frames, no ``[DONE]``).

    Usage comes only in the terminal event (``response.completed``, ``response.incomplete`` or
    ``response.failed``), inside its ``response``; a stream that ends without one is cut short.
    """

    __slots__ = ("background", "response_id")

    def __init__(self) -> None:
        super().__init__()
        self.response_id: str | None = None
        self.background = False  # the response runs in background mode: charged once, when it is done

    def _data(self, payload: bytes) -> dict[str, Any] | None:
        event = self._json(payload)
        if event is None:
            return None
        kind = event.get("type")
        if kind in _RESPONSES_TEXT:
            delta = event.get("delta")
            if isinstance(delta, str) and delta:
                self.content_chunks += 1
                self.text.append(delta)
        elif kind in _RESPONSES_END or kind == "response.created":
            response = event.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("model"), str):
                    self.served_model = response["model"]
                if isinstance(response.get("id"), str):
                    self.response_id = response["id"]
                self.background = response.get("background") is True
                if kind != "response.created":
                    self.usage = usage_from_responses(response.get("usage"))
                    self.finished = True
                    if kind == "response.failed":
                        self.error = response.get("error") or {"message": "response failed"}
        elif kind == "error":
            self.error = event
        return event
