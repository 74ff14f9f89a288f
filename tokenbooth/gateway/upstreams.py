"""Which upstream serves which model."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from tokenbooth.config import RouteTarget, UpstreamConfig
from tokenbooth.errors import ModelNotFound
from tokenbooth.memo import remember

__all__ = ["Router"]


class Router:
    """Routes a model name to the first upstream whose ``models`` list matches it.

    Entries are exact names or shell patterns (``gpt-4o*``, ``*``); exact names win
    over patterns, and patterns are tried in configuration order.
    """

    def __init__(self, upstreams: Sequence[UpstreamConfig],
                 routes: Mapping[str, Sequence[RouteTarget]] | None = None) -> None:
        self.upstreams = tuple(upstreams)
        by_name = {up.name: up for up in self.upstreams}
        self._chains: dict[str, tuple[tuple[UpstreamConfig, str], ...]] = {
            model: tuple((by_name[t.upstream], t.model or model) for t in chain)
            for model, chain in (routes or {}).items()
        }
        self._exact: dict[str, UpstreamConfig] = {}
        self._patterns: list[tuple[str, UpstreamConfig]] = []
        for up in self.upstreams:
            for name in up.models:
                if any(c in name for c in "*?["):
                    self._patterns.append((name, up))
                else:
                    self._exact.setdefault(name, up)
        self._cache: dict[str, UpstreamConfig] = {}  # by the model the client named: bounded (remember)

    @property
    def explicit_models(self) -> list[str]:
        """Model names configured by exact name, fallback chains first."""
        return [*self._chains, *(m for m in self._exact if m not in self._chains)]

    def targets(self, model: str) -> tuple[tuple[UpstreamConfig, str], ...]:
        """The (upstream, model) pairs to try in order: a fallback chain, or the one route."""
        chain = self._chains.get(model)
        if chain is not None:
            return chain
        return ((self.route(model), model),)

    @property
    def wildcard(self) -> UpstreamConfig | None:
        """The first upstream that serves any model, if one does."""
        return next((up for pattern, up in self._patterns if pattern == "*"), None)

    def route(self, model: str) -> UpstreamConfig:
        """The upstream serving ``model`` by the upstreams' ``models`` lists (chains aside)."""
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        up = self._exact.get(model)
        if up is None:
            up = next((u for pattern, u in self._patterns if fnmatch.fnmatchcase(model, pattern)), None)
        if up is None:
            raise ModelNotFound(model)
        return remember(self._cache, model, up)
