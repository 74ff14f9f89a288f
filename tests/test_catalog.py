from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenbooth.catalog import CATALOG, Metrics, render_markdown
from tokenbooth.meter import ModelLabels

DOC = Path(__file__).parent.parent / "docs" / "metrics.md"


def test_docs_metrics_md_is_generated_from_the_catalog() -> None:
    assert DOC.read_text() == render_markdown(), "run: python -m tokenbooth.catalog > docs/metrics.md"


def test_names_follow_prometheus_conventions() -> None:
    names = [s.name for s in CATALOG]
    assert len(names) == len(set(names))
    for s in CATALOG:
        assert s.name.startswith("tokenbooth_")
        assert s.name.endswith("_total") == (s.kind == "counter"), s.name
        assert not {"request_id", "user", "key", "session_id", "prompt"} & set(s.labels), s.name


def test_latency_buckets_reach_minutes() -> None:
    spec = next(s for s in CATALOG if s.name == "tokenbooth_request_duration_seconds")
    assert spec.buckets is not None and max(spec.buckets) >= 300


def test_every_catalog_metric_is_exported_once_with_its_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.requests.labels("openai", "gpt-4o", "chat", "success", "").inc()
    text = generate_latest(registry).decode()
    for s in CATALOG:
        assert f"# TYPE {s.name} {s.kind}" in text or f"# TYPE {s.name.removesuffix('_total')} {s.kind}" in text
    assert 'tokenbooth_requests_total{error_type="",model="gpt-4o",operation="chat",outcome="success",' \
           'provider="openai"} 1.0' in text


@pytest.mark.parametrize(("name", "label"), [("gpt-4o", "gpt-4o"), ("claude-3-5-sonnet", "claude-3-5-sonnet"),
                                              ("my-model", "my-model"), ("gpt-4o-typo", "other"), ("", "")])
def test_model_labels_fold_unknown_names_to_other(name: str, label: str) -> None:
    assert ModelLabels(["my-model"])(name) == label
