"""PromQL checks without a server: every rule and dashboard query parses and uses metrics correctly.

:func:`check_query` parses an expression with ``promql-parser`` and reports, in plain words,
what published rule sets for LLM APIs get wrong:

- a metric that is not in the catalog (``tokenbooth/catalog.py``), not a recording rule, and not
  ``up`` or the Pushgateway's ``push_time_seconds`` (a typo there is a silent, empty panel);
- a label the metric does not have (``status`` on requests, which have ``outcome``);
- ``rate()``, ``irate()`` or ``increase()`` over a gauge (they are for counters);
- ``histogram_quantile()`` over anything but ``sum by (le, ...)`` of bucket rates.

Grafana's variables (``$__rate_interval``, ``$model``) are replaced by sample values first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import promql_parser as pp

from tokenbooth.catalog import CATALOG, MetricSpec

__all__ = ["Catalog", "check_query", "grafana_to_promql"]

_COUNTER_FUNCS = {"rate", "irate", "increase", "resets"}
_EXTERNAL = {
    "up": ("job", "instance"),
    "push_time_seconds": ("job", "instance"),  # plus the pushing job's grouping labels
}
# PRODUCT.md: requests, tokens and cost get a `tenant` label when tenant labels are enabled.
_TENANT = {"tokenbooth_requests_total", "tokenbooth_tokens_total", "tokenbooth_cost_usd_total"}
_TARGET_LABELS = ("job", "instance")
_GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1d"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class Catalog:
    """What queries may use: catalog metrics (with histogram suffixes) and recording rules."""

    series: dict[str, tuple[MetricSpec | None, tuple[str, ...]]]

    @classmethod
    def build(cls, recording_rules: Iterable[str] = ()) -> Catalog:
        """The catalog's metrics, ``up``, ``push_time_seconds`` and the given recording rule names."""
        series: dict[str, tuple[MetricSpec | None, tuple[str, ...]]] = {}
        for spec in CATALOG:
            extra = _TARGET_LABELS + (("tenant",) if spec.name in _TENANT else ())
            if spec.kind == "histogram":
                series[f"{spec.name}_bucket"] = (spec, (*spec.labels, "le", *extra))
                series[f"{spec.name}_count"] = (spec, (*spec.labels, *extra))
                series[f"{spec.name}_sum"] = (spec, (*spec.labels, *extra))
            else:
                series[spec.name] = (spec, (*spec.labels, *extra))
        for name, labels in _EXTERNAL.items():
            series[name] = (None, labels)
        for name in recording_rules:
            series[name] = (None, ())
        return cls(series)

    def is_counter(self, name: str) -> bool:
        """Whether ``rate()`` and ``increase()`` apply: a counter, or a histogram's bucket, count or sum."""
        spec = self.series.get(name, (None, ()))[0]
        return spec is not None and (spec.kind == "counter" or spec.kind == "histogram")


def grafana_to_promql(expr: str) -> str:
    """A Grafana query with its variables replaced: durations by sample durations, others by ``.*``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return _GRAFANA_DURATIONS.get(name, ".*")

    return _VARIABLE.sub(sub, expr)


def _name(vs: pp.VectorSelector) -> str | None:
    if vs.name:
        return vs.name
    for m in vs.matchers.matchers:
        if m.name == "__name__" and m.op == pp.MatchOp.Equal:
            return m.value
    return None


def check_query(expr: str, catalog: Catalog) -> list[str]:
    """What is wrong with one PromQL expression, in plain words (an empty list when nothing is)."""
    try:
        tree = pp.parse(expr)
    except ValueError as exc:
        return [f"does not parse as PromQL: {exc}"]
    problems: list[str] = []

    def visit(node: pp.Expr) -> None:
        if isinstance(node, pp.VectorSelector):
            name = _name(node)
            if name is None:
                problems.append(f"selects series without a fixed metric name: {node}")
            elif name not in catalog.series:
                problems.append(f"uses '{name}', which is not a tokenbooth metric, a recording rule, up or "
                                "push_time_seconds")
            else:
                spec, labels = catalog.series[name]
                for m in node.matchers.matchers:
                    if spec is not None and m.name not in labels:
                        problems.append(f"filters {name} on label '{m.name}', which it does not have "
                                        f"(labels: {', '.join(labels)})")
        elif isinstance(node, pp.Call):
            func = node.func.name
            if func in _COUNTER_FUNCS:
                for arg in node.args:
                    if isinstance(arg, pp.MatrixSelector):
                        name = _name(arg.vector_selector)
                        if name and name in catalog.series and not catalog.is_counter(name):
                            problems.append(f"applies {func}() to {name}, which is not a counter "
                                            "(rate and increase are for counters; use the gauge itself, "
                                            "or deriv())")
            elif func == "histogram_quantile":
                arg = node.args[1] if len(node.args) > 1 else None
                if not _sums_by_le(arg):
                    problems.append("calls histogram_quantile() on something other than sum by (le, ...) "
                                    "(rate(..._bucket[...])): without it, series of different instances or "
                                    "labels are mixed bucket by bucket")

    pp.walk(tree, visit)
    return problems


def _sums_by_le(arg: pp.Expr | None) -> bool:
    while isinstance(arg, pp.ParenExpr):
        arg = arg.expr
    if not isinstance(arg, pp.AggregateExpr) or str(arg.op) != "sum" or arg.modifier is None:
        return False
    labels = list(arg.modifier.labels)
    if arg.modifier.type == pp.AggModifierType.By:
        return "le" in labels
    return "le" not in labels
