from __future__ import annotations

from prometheus_client import CollectorRegistry

from tokenbooth.catalog import Metrics, total
from tokenbooth.meter import Meter, ModelLabels


def test_in_flight_gauges_are_kept_per_label_not_per_model_name() -> None:
    registry = CollectorRegistry()
    meter = Meter(Metrics(registry), ModelLabels(["known"], genai_prices=False))
    gauges = [meter.in_flight("openai", f"client-model-{n}") for n in range(5000)]
    for gauge in gauges:
        gauge.inc()
    meter.in_flight("openai", "known").inc()
    assert len(meter._children) == 2  # "other" and "known"
    assert total(registry, "tokenbooth_in_flight_requests", model="other") == 5000
    assert total(registry, "tokenbooth_in_flight_requests", model="known") == 1
