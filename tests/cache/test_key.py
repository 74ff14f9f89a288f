"""The cache key: equal requests get equal keys, however they are written; any change that may
change the answer gives another key."""

from __future__ import annotations

import random
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbooth.cache.key import IGNORED_FIELDS, cache_key, canonical

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                     st.floats(allow_nan=False, allow_infinity=False, width=64), st.text(max_size=8))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_bodies = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in IGNORED_FIELDS), _json,
                          min_size=1, max_size=6)


def _rewritten(value: Any, rng: random.Random) -> Any:
    """The same JSON value written another way: keys in another order, whole numbers as floats."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _rewritten(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_rewritten(v, rng) for v in value]
    if type(value) is int and abs(value) < 2**53 and rng.random() < 0.5:
        return float(value)
    return value


def _key(body: dict[str, Any], **kw: Any) -> str | None:
    args = {"endpoint": "/chat/completions", "upstream": "up", "model": "m", "scope": "tenant:a", **kw}
    return cache_key(args.pop("endpoint"), args.pop("upstream"), args.pop("model"), body, args.pop("scope"), **args)


@settings(max_examples=100, deadline=None)
@given(_bodies, st.integers(0, 2**32))
def test_equal_requests_give_equal_keys_whatever_their_field_order_and_number_formatting(
        body: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    again = orjson.loads(orjson.dumps(_rewritten(body, rng)))  # as it arrives on the wire
    extra = {"stream_options": {"include_usage": True}, "user": "u-1", "metadata": {"run": seed}}
    assert _key(body) == _key({**again, **extra})


@settings(max_examples=100, deadline=None)
@given(_bodies, st.sampled_from(["tools", "tool_choice", "response_format", "temperature", "seed", "messages",
                                 "max_tokens", "top_p", "n", "stop", "reasoning_effort"]), _scalars)
def test_changing_any_answer_relevant_field_changes_the_key(body: dict[str, Any], name: str, value: Any) -> None:
    changed = {**body, name: value}
    sort = orjson.OPT_SORT_KEYS
    if name in body and orjson.dumps(canonical(body[name]), option=sort) == orjson.dumps(canonical(value), option=sort):
        changed[name] = [value]  # the same value written another way: make it a change
    assert _key(body) != _key(changed)


def test_what_is_around_the_body_is_part_of_the_key() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    base = _key(body)
    assert len({base, _key(body, scope="tenant:b"), _key(body, scope="global"), _key(body, upstream="other"),
                _key(body, model="m2"), _key(body, endpoint="/messages"), _key(body, stream=True),
                _key(body, headers=[("anthropic-beta", "x")]), _key(body, query="beta=true")}) == 9
    assert _key({**body, "stream": True}) == base  # the form of the answer is the stream argument, not the field


def test_a_body_that_cannot_be_written_canonically_has_no_key() -> None:
    assert _key({"model": "m", "n": 2**70}) is None
