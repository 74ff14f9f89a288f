from __future__ import annotations

import pytest

from tokenbooth.config import UpstreamConfig
from tokenbooth.errors import ModelNotFound
from tokenbooth.gateway.upstreams import Router
from tokenbooth.memo import MEMO_LIMIT


def test_routes_of_distinct_model_names_are_remembered_within_a_bound() -> None:
    gpt = UpstreamConfig(name="gpt", base_url="http://127.0.0.1:1/v1", models=("gpt-*",))
    rest = UpstreamConfig(name="rest", base_url="http://127.0.0.1:2/v1", models=("exact", "*"))
    router = Router([gpt, rest])
    for n in range(2 * MEMO_LIMIT + 10):
        assert router.route(f"gpt-{n}") is gpt
        assert router.route(f"client-model-{n}") is rest
    assert 0 < len(router._cache) <= MEMO_LIMIT
    assert router.route("exact") is rest


def test_a_model_no_upstream_serves_is_not_remembered() -> None:
    router = Router([UpstreamConfig(name="gpt", base_url="http://127.0.0.1:1/v1", models=("gpt-*",))])
    for n in range(100):
        with pytest.raises(ModelNotFound):
            router.route(f"client-model-{n}")
    assert not router._cache
