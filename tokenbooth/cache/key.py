"""The cache key of a request: equal for requests that must get the same answer, different otherwise.

A SHA-256 over a canonical JSON (keys sorted, whole floats written as integers) of: a key-format
version, the endpoint, the resolved upstream and model, the scope (a tenant, a key, or global),
the form of the answer (streamed or not), the request headers and query string that reach the
upstream and may change its answer, and the whole request body minus the fields that do not
change the answer (``stream``, ``stream_options``, ``user``, ``metadata``).

>>> a = cache_key("/v1/chat/completions", "up", "m", {"model": "m", "temperature": 0, "user": "x"}, "t")
>>> a == cache_key("/v1/chat/completions", "up", "m", {"temperature": 0.0, "model": "m"}, "t")
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

__all__ = ["IGNORED_FIELDS", "KEY_VERSION", "cache_key", "canonical"]

KEY_VERSION = 1  # bump when what goes into a key changes: old entries then simply miss
# fields that never change the answer; `stream` is kept apart, as the answer's form
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata"})
_EXACT = 2**53  # floats up to here that are whole are exactly their integer


def canonical(value: Any) -> Any:
    """``value`` with every whole float as an int (``1.0`` and ``1e0`` are ``1``), so a number means
    the same whatever way the client wrote it. Key order is left to the serializer."""
    kind = type(value)
    if kind is dict:
        return {k: canonical(v) for k, v in value.items()}
    if kind is list:
        return [canonical(v) for v in value]
    if kind is float and value.is_integer() and -_EXACT < value < _EXACT:
        return int(value)
    return value


def _whole_floats(value: Any) -> bool:
    """Whether ``value`` holds a float :func:`canonical` would change. Most bodies hold none: looking
    allocates nothing, where rewriting copies every container."""
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if kind is str:
            continue
        if kind is float:
            if item.is_integer():
                return True
        elif (kind is dict or kind is list) and _whole_floats(item):
            return True
    return False


def cache_key(endpoint: str, upstream: str, model: str, payload: dict[str, Any], scope: str, *,
              stream: bool = False, headers: Sequence[tuple[str, str]] = (), query: str = "") -> str | None:
    """The hex key of a request, or None when its body cannot be written canonically (an integer
    beyond 64 bits, say): such a request is not cached."""
    body = {k: v for k, v in payload.items() if k not in IGNORED_FIELDS}
    if _whole_floats(body):
        body = canonical(body)
    doc = [KEY_VERSION, endpoint, upstream, model, scope, stream, sorted(headers), query, body]
    try:
        data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.sha256(data).hexdigest()
