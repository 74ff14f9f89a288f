"""The SDK's per-process state: one set of metrics per registry, one writer per ledger URL.

Nothing here is created at import time; the first ``instrument()`` or ``agent_session()``
builds what it needs, and an interpreter exit flushes the ledgers.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry

from tokenbooth.calls import Recorder
from tokenbooth.catalog import Metrics
from tokenbooth.config import TokensConfig
from tokenbooth.ledger.schema import connect
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.meter import Meter, ModelLabels
from tokenbooth.pricing import PriceBook
from tokenbooth.tokens import TokenEstimator

__all__ = ["Runtime", "get_runtime"]

_lock = threading.Lock()
_metrics: dict[int, tuple[CollectorRegistry, Metrics]] = {}
_writers: dict[str, LedgerWriter] = {}
_runtimes: dict[tuple[int, int | str | None], Runtime] = {}
_shared: dict[str, object] = {}


@dataclass(frozen=True)
class Runtime:
    """What instrumented clients and agent sessions record through."""

    metrics: Metrics
    meter: Meter
    recorder: Recorder
    ledger: LedgerWriter | None


def _metrics_for(registry: CollectorRegistry) -> Metrics:
    hit = _metrics.get(id(registry))
    if hit is None:
        hit = (registry, Metrics(registry))  # the registry is held, so its id stays unique
        _metrics[id(registry)] = hit
    return hit[1]


def _writer_for(ledger: str | LedgerWriter | None, metrics: Metrics) -> LedgerWriter | None:
    if ledger is None or isinstance(ledger, LedgerWriter):
        return ledger
    writer = _writers.get(ledger)
    if writer is None:
        writer = LedgerWriter(connect(ledger), metrics)
        writer.start()
        atexit.register(writer.close)
        _writers[ledger] = writer
    return writer


def _prices() -> PriceBook:
    book = _shared.get("prices")
    if book is None:
        book = PriceBook()
        book.warm()
        _shared["prices"] = book
    assert isinstance(book, PriceBook)
    return book


def _labels() -> ModelLabels:
    labels = _shared.get("labels")
    if labels is None:
        labels = ModelLabels()
        _shared["labels"] = labels
    assert isinstance(labels, ModelLabels)
    return labels


def get_runtime(registry: CollectorRegistry | None = None,
                ledger: str | LedgerWriter | None = None) -> Runtime:
    """The runtime for a registry (prometheus_client's default when None) and a ledger.

    ``ledger`` is a database URL (a batched writer is started and flushed at exit), a
    ``LedgerWriter`` you manage, or None for metrics only.
    """
    registry = registry if registry is not None else REGISTRY
    ledger_key: int | str | None = ledger if isinstance(ledger, str) or ledger is None else id(ledger)
    key = (id(registry), ledger_key)
    with _lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            metrics = _metrics_for(registry)
            writer = _writer_for(ledger, metrics)
            meter = Meter(metrics, _labels(), writer)
            # In-process, estimates only fill gaps (interrupted streams, missing usage); the
            # tokenizer vocabularies load on the first one. No sampled reconciliation here.
            recorder = Recorder(meter, _prices(), TokensConfig(reconcile_sample=0), TokenEstimator())
            runtime = Runtime(metrics, meter, recorder, writer)
            _runtimes[key] = runtime
        return runtime
