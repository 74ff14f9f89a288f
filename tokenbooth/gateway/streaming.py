"""Reading an OpenAI server-sent-event stream on the side, to meter it.

The bytes go to the client untouched; :class:`SSEMeter` only looks at them.
"""

from __future__ import annotations

from typing import Any

import orjson

from tokenbooth.record import TokenUsage
from tokenbooth.tokens import usage_from_openai

__all__ = ["SSEMeter"]


class SSEMeter:
    """Follows an OpenAI-format event stream: first content, served model, reported usage."""

    __slots__ = ("_buf", "content_chunks", "done", "error", "served_model", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.content_chunks = 0
        self.usage: TokenUsage | None = None
        self.served_model: str | None = None
        self.done = False
        self.error: Any = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes; True when they hold the stream's first content."""
        data = self._buf + chunk if self._buf else chunk
        before = self.content_chunks
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            if line.startswith(b"data:"):
                self._event(line[5:].strip())
        self._buf = data[start:]
        return before == 0 and self.content_chunks > 0

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            self.error = event["error"]
            return
        if self.served_model is None and isinstance(event.get("model"), str):
            self.served_model = event["model"]
        usage = event.get("usage")
        if usage:
            self.usage = usage_from_openai(usage)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") or delta.get("reasoning_content") if isinstance(delta, dict) else None
            if text or choice.get("text"):
                self.content_chunks += 1
                break
