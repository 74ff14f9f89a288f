"""Which upstream serves which model."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from tokenbooth.config import UpstreamConfig
from tokenbooth.errors import ModelNotFound

__all__ = ["Router"]

_CACHE_LIMIT = 4096


class Router:
    """Routes a model name to the first upstream whose ``models`` list matches it.

    Entries are exact names or shell patterns (``gpt-4o*``, ``*``); exact names win
    over patterns, and patterns are tried in configuration order.
    """

    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        self.upstreams = tuple(upstreams)
        self._exact: dict[str, UpstreamConfig] = {}
        self._patterns: list[tuple[str, UpstreamConfig]] = []
        for up in self.upstreams:
            for name in up.models:
                if any(c in name for c in "*?["):
                    self._patterns.append((name, up))
                else:
                    self._exact.setdefault(name, up)
        self._cache: dict[str, UpstreamConfig] = {}

    @property
    def explicit_models(self) -> list[str]:
        """Model names configured by exact name."""
        return list(self._exact)

    @property
    def wildcard(self) -> UpstreamConfig | None:
        """The first upstream that serves any model, if one does."""
        return next((up for pattern, up in self._patterns if pattern == "*"), None)

    def route(self, model: str) -> UpstreamConfig:
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        up = self._exact.get(model)
        if up is None:
            up = next((u for pattern, u in self._patterns if fnmatch.fnmatchcase(model, pattern)), None)
        if up is None:
            raise ModelNotFound(model)
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[model] = up
        return up
