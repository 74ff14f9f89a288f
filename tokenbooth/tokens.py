"""Token accounting: usage as the upstreams report it, and local estimates when they do not.

Reported usage always wins. An estimate fills in when there is none (a stream the client
hung up on, an upstream that omits usage) and is marked ``estimated``. Estimates count exactly
for OpenAI model families (``tokenbooth.bpe``, over the vocabularies bundled offline by
``bpe-openai``; tiktoken would download its own at first use), and use a CJK-aware heuristic
for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tokenbooth import bpe
from tokenbooth.memo import remember
from tokenbooth.record import TokenUsage

__all__ = ["TokenEstimator", "differs", "usage_from_anthropic", "usage_from_openai", "usage_from_responses"]


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def _detail(usage: dict[str, Any], part: str, name: str) -> int:
    """``usage[part][name]`` as a count (0 when either is missing or not what it should be)."""
    details = usage.get(part)
    return _int(details.get(name)) if isinstance(details, dict) else 0


def usage_from_openai(usage: Any) -> TokenUsage | None:
    """Read an OpenAI-style ``usage`` object (chat, completions, embeddings).

    Cached input comes from ``prompt_tokens_details.cached_tokens`` (OpenAI) or
    ``prompt_cache_hit_tokens`` (DeepSeek); reasoning from
    ``completion_tokens_details.reasoning_tokens``. Returns None when there is no usage.

    >>> usage_from_openai({"prompt_tokens": 10, "completion_tokens": 5,
    ...                    "prompt_tokens_details": {"cached_tokens": 4}})
    TokenUsage(input=10, output=5, cached_input=4, cache_write=0, reasoning=0, estimated=False)
    """
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if not prompt and not completion:
        total = _int(usage.get("total_tokens"))
        if not total:
            return None
        prompt = total
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens") or _int(usage.get("prompt_cache_hit_tokens"))
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return TokenUsage(
        input=prompt,
        output=completion,
        cached_input=min(cached, prompt),
        reasoning=min(reasoning, completion),
    )


def usage_from_anthropic(usage: Any) -> TokenUsage | None:
    """Read an Anthropic ``usage`` object.

    Anthropic's ``input_tokens`` leaves out cache reads and writes; tokenbooth's input is
    the total, so the three are added and the cache parts kept as their own kinds.

    >>> usage_from_anthropic({"input_tokens": 10, "output_tokens": 5,
    ...                       "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20})
    TokenUsage(input=130, output=5, cached_input=100, cache_write=20, reasoning=0, estimated=False)
    """
    if not isinstance(usage, dict):
        return None
    uncached = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    write = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    if not (uncached or read or write or output):
        return None
    return TokenUsage(input=uncached + read + write, output=output, cached_input=read, cache_write=write)


def usage_from_responses(usage: Any) -> TokenUsage | None:
    """Read the OpenAI Responses API's ``usage``: cached tokens are inside ``input_tokens``
    (``input_tokens_details.cached_tokens``, and ``cache_write_tokens`` where a provider reports
    it), reasoning tokens inside ``output_tokens``, as in chat.

    >>> usage_from_responses({"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1024},
    ...                       "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 100}})
    TokenUsage(input=2000, output=300, cached_input=1024, cache_write=0, reasoning=100, estimated=False)
    """
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("input_tokens"))
    completion = _int(usage.get("output_tokens"))
    if not prompt and not completion:
        return None
    cached = min(_detail(usage, "input_tokens_details", "cached_tokens"), prompt)
    write = _detail(usage, "input_tokens_details", "cache_write_tokens") or \
        _detail(usage, "input_tokens_details", "cache_creation_tokens")
    reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
    return TokenUsage(input=prompt, output=completion, cached_input=cached, cache_write=min(write, prompt - cached),
                      reasoning=min(reasoning, completion))


def differs(reported: int, estimated: int, threshold: float) -> bool:
    """True when an estimate is off from the reported count by more than ``threshold`` (a ratio)."""
    if reported == estimated:
        return False
    return abs(reported - estimated) > threshold * max(reported, 1)


_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "o1", "o3", "o4")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3040 <= o <= 0x30FF
            or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F)


def heuristic_tokens(text: str) -> int:
    """A tokenizer-free estimate: about one token per CJK character, one per four other characters.

    >>> heuristic_tokens("hello world!"), heuristic_tokens("你好，世界")
    (3, 5)
    """
    if not text:
        return 0
    cjk = sum(1 for ch in text if ch >= "\u3040" and _is_cjk(ch))
    return cjk + math.ceil((len(text) - cjk) / 4)


def _flatten(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts with ``text`` (lists nested
    in lists too, walked without recursion and at most ``_MAX_DEPTH`` deep, so a hostile body
    1,000 levels deep is counted, not a RecursionError)."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    stack = [(content, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, list) and depth < _MAX_DEPTH:
            stack.extend((p.get("text") if isinstance(p, dict) else p, depth + 1) for p in reversed(item))
    return " ".join(parts)


_MAX_DEPTH = 32


class TokenEstimator:
    """Counts tokens locally. ``count(model, text)`` picks the model family's tokenizer."""

    def __init__(self, use_bpe: bool = True) -> None:
        self.use_bpe = use_bpe
        self._by_model: dict[str, Callable[[str], int]] = {}  # by the model the client named: bounded (remember)

    def warm(self) -> None:
        """Load both vocabularies now (~0.3 s, ~7 MB together) rather than stall the event
        loop on the first estimate of each family."""
        if self.use_bpe:
            for encoding in bpe.ENCODINGS:
                bpe.counter(encoding)

    def counter(self, model: str) -> Callable[[str], int]:
        hit = self._by_model.get(model)
        if hit is not None:
            return hit
        name = model.rsplit("/", 1)[-1].lower()
        encoding = None
        if not self.use_bpe:
            pass
        elif name.startswith(_O200K_PREFIXES):
            encoding = "o200k_base"
        elif name.startswith(_CL100K_PREFIXES):
            encoding = "cl100k_base"
        if encoding is None:
            fn: Callable[[str], int] = heuristic_tokens
        else:
            exact = bpe.counter(encoding).count

            def fn(text: str) -> int:
                return exact(text) if text else 0

        return remember(self._by_model, model, fn)

    def count(self, model: str, text: str) -> int:
        return self.counter(model)(text)

    def prompt(self, model: str, payload: dict[str, Any]) -> int:
        """Estimate the input tokens of a request body (chat, completions, embeddings, messages).

        Chat adds OpenAI's framing: 3 tokens per message and 3 to prime the reply.
        """
        count = self.counter(model)
        messages = payload.get("messages")
        if isinstance(messages, list):
            total = 3
            system = payload.get("system")  # Anthropic's system prompt is outside the messages
            if system:
                total += count(_flatten(system))
            for m in messages:
                if isinstance(m, dict):
                    total += 3 + count(_flatten(m.get("content")))
            return total
        instructions = payload.get("instructions")  # the Responses API's system prompt
        extra = count(instructions) if isinstance(instructions, str) else 0
        for key in ("prompt", "input"):
            value = payload.get(key)
            if isinstance(value, str):
                return extra + count(value)
            if isinstance(value, list) and any(isinstance(v, dict) for v in value):
                # Responses API input items: messages (content a string or parts) and tool outputs
                total = extra + 3
                for item in value:
                    if isinstance(item, dict):
                        text = item.get("content", item.get("output", item.get("arguments")))
                        total += 3 + count(_flatten(text) if not isinstance(text, str) else text)
                return total
            if isinstance(value, list):
                return sum(count(v) if isinstance(v, str) else len(v) if isinstance(v, list) else 1
                           for v in value)
        return 0
