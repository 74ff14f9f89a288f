"""Token usage as the upstreams report it, normalised to :class:`TokenUsage`."""

from __future__ import annotations

from typing import Any

from tokenbooth.record import TokenUsage

__all__ = ["usage_from_openai"]


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


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
    cached = 0
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = _int(details.get("cached_tokens"))
    if not cached:
        cached = _int(usage.get("prompt_cache_hit_tokens"))
    reasoning = 0
    out_details = usage.get("completion_tokens_details")
    if isinstance(out_details, dict):
        reasoning = _int(out_details.get("reasoning_tokens"))
    return TokenUsage(
        input=prompt,
        output=completion,
        cached_input=min(cached, prompt),
        reasoning=min(reasoning, completion),
    )
