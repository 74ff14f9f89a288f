"""The meter: one CallRecord in, metrics and a ledger row out.

The gateway and the SDK both feed it, so a number means the same thing whichever
way it was measured. Recording never raises into the caller: a failure is logged,
and a row the ledger could not take is counted by the ledger writer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from tokenbooth.catalog import Metrics
from tokenbooth.record import CallRecord, Outcome

__all__ = ["Meter", "ModelLabels", "RowSink", "TenantLabels"]

log = logging.getLogger("tokenbooth.meter")

OTHER = "other"


class RowSink(Protocol):
    """Where ledger rows go (the batched ledger writer, or nothing)."""

    def submit(self, record: CallRecord) -> None: ...


class ModelLabels:
    """Folds model names to a bounded label set: known names pass, anything else is ``other``."""

    def __init__(self, known: Iterable[str] = (), *, genai_prices: bool = True) -> None:
        self._known = set(known)
        if genai_prices:
            self._known |= _genai_model_ids()

    def __call__(self, model: str) -> str:
        return model if model in self._known or not model else OTHER  # "": a call that names no model

    def __contains__(self, model: object) -> bool:
        return model in self._known


class TenantLabels:
    """Folds tenants to at most ``cap`` label values: the first seen (configured ones first) keep
    their name, later ones are ``other``; a call without a tenant is ``""``."""

    def __init__(self, known: Iterable[str] = (), cap: int = 50) -> None:
        self.cap = cap
        self._kept: set[str] = set(list(known)[:cap])

    def __call__(self, tenant: str | None) -> str:
        if not tenant:
            return ""
        if tenant in self._kept:
            return tenant
        if len(self._kept) < self.cap:
            self._kept.add(tenant)
            return tenant
        return OTHER


def _genai_model_ids() -> set[str]:
    from genai_prices import data_snapshot

    return {m.id for p in data_snapshot.get_snapshot().providers for m in p.models}


class Meter:
    """Turns records into metrics and ledger rows.

    >>> from prometheus_client import CollectorRegistry
    >>> meter = Meter(Metrics(CollectorRegistry()), ModelLabels(["m"], genai_prices=False))
    """

    def __init__(self, metrics: Metrics, models: ModelLabels, sink: RowSink | None = None,
                 tenants: TenantLabels | None = None) -> None:
        self.metrics = metrics
        self.models = models
        self.sink = sink
        self.tenants = tenants or TenantLabels()
        self._children: dict[tuple[str, ...], Any] = {}  # by label values, folded: as bounded as the labels

    def in_flight(self, provider: str, model: str) -> Any:
        """The in-flight gauge child for a call; ``inc()`` when it starts, ``dec()`` when it ends."""
        key = ("in_flight", provider, self.models(model))  # folded first: the client names the model
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metrics.in_flight.labels(*key[1:])
        return child

    def _mismatch(self, provider: str, model: str) -> Any:
        return self.metrics.estimate_mismatch.labels(provider, model)

    def record(self, rec: CallRecord) -> None:
        """Count the call in metrics and hand its row to the ledger. Never raises."""
        self.metrics.calls_recorded += 1
        try:
            self._observe(rec)
        except Exception:  # instrumentation must never break a request
            log.exception("metering failed for request %s", rec.request_id)
        if self.sink is not None:
            try:
                self.sink.submit(rec)
            except Exception:
                log.exception("ledger submit failed for request %s", rec.request_id)

    def _observe(self, rec: CallRecord) -> None:
        m = self.metrics
        model = self.models(rec.model)
        op = rec.operation.value
        outcome = rec.outcome.value
        tenant = (self.tenants(rec.tenant),) if m.tenant_labels else ()
        key = (rec.provider, model, op, outcome, rec.error_type.value, *tenant)
        children = self._children.get(key)
        if children is None:
            children = (
                m.requests.labels(rec.provider, model, op, outcome, rec.error_type.value, *tenant),
                m.request_duration.labels(rec.provider, model, op, outcome),
                m.tokens.labels(rec.provider, model, op, "input", *tenant),
                m.tokens.labels(rec.provider, model, op, "output", *tenant),
                m.tokens.labels(rec.provider, model, op, "cached_input", *tenant),
                m.tokens.labels(rec.provider, model, op, "cache_write", *tenant),
                m.tokens.labels(rec.provider, model, op, "reasoning", *tenant),
                m.cost_usd.labels(rec.provider, model, *tenant),
                m.unpriced.labels(rec.provider, model),
                m.ttft.labels(rec.provider, model, op),
                m.time_per_output_token.labels(rec.provider, model),
            )
            self._children[key] = children
        (requests, duration, t_in, t_out, t_cached, t_write, t_reason, cost, unpriced, ttft, tpot) = children
        requests.inc()
        duration.observe(rec.duration_s)
        u = rec.usage
        if u.input:
            t_in.inc(u.input)
        if u.output:
            t_out.inc(u.output)
        if u.cached_input:
            t_cached.inc(u.cached_input)
        if u.cache_write:
            t_write.inc(u.cache_write)
        if u.reasoning:
            t_reason.inc(u.reasoning)
        if rec.cost is not None:
            if rec.cost.usd:
                cost.inc(float(rec.cost.usd))
        elif u.input or u.output:
            unpriced.inc()
        if rec.streamed and rec.ttft_s is not None:
            ttft.observe(rec.ttft_s)
            if rec.tpot_s is not None and rec.outcome is Outcome.SUCCESS:
                tpot.observe(rec.tpot_s)
        if rec.tokens_mismatch:
            self._mismatch(rec.provider, model).inc()
        if rec.cache is not None:
            self._cache(rec, model)

    def _cache(self, rec: CallRecord, model: str) -> None:
        m = self.metrics
        assert rec.cache is not None
        key = ("cache", rec.cache)
        result = self._children.get(key)
        if result is None:
            result = self._children[key] = m.cache_requests.labels(rec.cache)
        result.inc()
        if rec.saved is None:
            return
        if rec.saved_cost is not None and rec.saved_cost.usd:
            m.cache_saved_usd.labels(rec.provider, model).inc(float(rec.saved_cost.usd))
        s = rec.saved
        for kind, n in (("input", s.input), ("output", s.output), ("cached_input", s.cached_input),
                        ("cache_write", s.cache_write), ("reasoning", s.reasoning)):
            if n:
                m.cache_saved_tokens.labels(kind).inc(n)
