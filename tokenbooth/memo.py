"""Bounded memos: answers remembered by a key that a client or an upstream may choose.

A model name is the client's to choose, and so is the model an upstream says it served: a cache
keyed by one would keep every distinct name it was ever shown (10,000 distinct names took a
gateway from 154 MB of resident memory to 1 GB). So each such cache is a plain dict filled
through :func:`remember`, which holds it to a bound. A hit stays one dict lookup; only a miss
pays for the bound.

>>> memo: dict[str, int] = {}
>>> [remember(memo, name, n, limit=2) for n, name in enumerate("abc")]
[0, 1, 2]
>>> memo
{'c': 2}
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["MEMO_LIMIT", "remember"]

K = TypeVar("K")
V = TypeVar("V")

MEMO_LIMIT = 4096  # entries of one memo: every model a deployment serves, and then some


def remember(memo: dict[K, V], key: K, value: V, limit: int = MEMO_LIMIT) -> V:
    """Store ``value`` under ``key`` and return it; a full memo is emptied first.

    Emptied rather than trimmed oldest-first: it keeps no order (a hit never writes), it is safe
    for threads that share the memo (``clear`` is one step), and the names in use come straight
    back, at one miss each, once per ``limit`` distinct names.
    """
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
