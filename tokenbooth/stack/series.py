"""Synthetic metric series for ``promtool test rules``, minute by minute.

A :class:`Timeline` holds counters (as increments per minute) and gauges (as values per minute)
under the catalog's metric names and labels, and writes them in promtool's expanding notation
(``0+100x59 6000+500x30``). :meth:`Timeline.calls` turns "N calls a minute to this model, this
many failing, this fast" into every series the gateway would export for them, and
:meth:`Timeline.budget` "this tenant spends so much of its budget a minute" into its budget
gauges, so a test reads as traffic, not as numbers.

:func:`render` expands the few Go-template forms the alert annotations use, the way Prometheus
does, so a test can state exactly what an alert will say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenbooth.catalog import DURATION_BUCKETS, TTFT_BUCKETS
from tokenbooth.stack.recording import le_label

__all__ = ["Calls", "Timeline", "humanize_duration", "quantize", "render"]


# Counter increments are rounded to multiples of 2**-20: sums of such numbers are exact in
# binary floating point, so promtool's running totals equal ours and a counter never steps
# back by a rounding error (which Prometheus would read as a reset).
_QUANTUM = 2.0**-20


def quantize(x: float) -> float:
    """``x`` on the grid counter increments are written on (see :meth:`Timeline.add`)."""
    return round(x / _QUANTUM) * _QUANTUM


def _fmt(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)  # repr round-trips exactly


def _merge(*observed: tuple[float, float]) -> dict[float, float]:
    out: dict[float, float] = {}
    for value, n in observed:
        out[value] = out.get(value, 0.0) + n
    return out


def _key(name: str, labels: Mapping[str, str]) -> str:
    # An empty label value is no label at all in Prometheus.
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if v != "")
    return f"{name}{{{inner}}}"


def _compress(values: list[float | None], steps: Sequence[float | None] | None = None) -> str:
    """Values in promtool's notation: runs of equal steps as ``a+bxn``, missing samples as ``_xn``.

    ``steps[j]``, when given, is the exact step from ``values[j-1]`` to ``values[j]`` (counters and
    rising gauges pass their increments, so float noise in the running total does not split a run).
    """

    def step(j: int) -> float | None:
        a, b = values[j - 1], values[j]
        if a is None or b is None:
            return None
        given = steps[j] if steps is not None else None
        return given if given is not None else b - a

    out: list[str] = []
    i = 0
    while i < len(values):
        v = values[i]
        j = i
        if v is None:
            while j + 1 < len(values) and values[j + 1] is None:
                j += 1
            out.append(f"_x{j - i + 1}")
        else:
            first = step(i + 1) if i + 1 < len(values) else None
            while first is not None and j + 1 < len(values) and step(j + 1) == first:
                j += 1
            if j == i:
                out.append(_fmt(v))
            else:
                assert first is not None
                out.append(f"{_fmt(v)}{'-' if first < 0 else '+'}{_fmt(abs(first))}x{j - i}")
        i = j + 1
    return " ".join(out)


@dataclass
class Calls:
    """Calls a minute to one model and how they went; :meth:`Timeline.calls` writes their series."""

    per_minute: float = 1000
    model: str = "gpt-4o"
    provider: str = "openai"
    failed: Mapping[str, float] = field(default_factory=dict)  # error_type -> calls a minute
    cancelled: float = 0
    latency: float = 1.0  # seconds, successful calls
    slow: float = 0  # successful calls a minute that take `slow_latency` instead
    slow_latency: float = 60.0
    error_latency: float = 0.25
    ttft: float | None = 0.5  # every successful call streams when set
    input_tokens: float = 1000  # per successful call
    output_tokens: float = 200
    cost: float = 0.0  # USD per successful call


class Timeline:
    """Series over ``minutes`` minutes (samples at minutes 0..minutes), for one promtool test group."""

    def __init__(self, minutes: int) -> None:
        self.minutes = minutes
        self._counters: dict[str, list[float]] = {}
        self._gauges: dict[str, list[float | None]] = {}
        self._gauge_steps: dict[str, list[float | None]] = {}

    def add(self, name: str, labels: Mapping[str, str], per_minute: float, start: int = 0,
            end: int | None = None) -> None:
        """Increase a counter by ``per_minute`` each minute after ``start`` up to ``end``."""
        inc = self._counters.setdefault(_key(name, labels), [0.0] * (self.minutes + 1))
        for m in range(start + 1, (self.minutes if end is None else end) + 1):
            inc[m] += quantize(per_minute)

    def set(self, name: str, labels: Mapping[str, str], value: float | None, start: int = 0,
            end: int | None = None, per_minute: float = 0.0) -> None:
        """Set a gauge to ``value`` (``None``: no sample) from ``start`` to ``end``, both included,
        rising by ``per_minute`` each minute after ``start`` (summed as promtool sums ``a+bxn``)."""
        key = _key(name, labels)
        vals = self._gauges.setdefault(key, [None] * (self.minutes + 1))
        steps = self._gauge_steps.setdefault(key, [None] * (self.minutes + 1))
        for m in range(start, (self.minutes if end is None else end) + 1):
            if m > start and value is not None:
                value += per_minute
                steps[m] = per_minute
            else:
                steps[m] = None
            vals[m] = value

    def budget(self, tenant: str, window: str, limit: float, spent: float, start: int = 0, end: int | None = None,
               per_minute: float = 0.0, target: Mapping[str, str] | None = None) -> None:
        """A tenant's budget gauges as a gateway exports them: ``spent`` USD of ``limit`` at ``start``,
        rising ``per_minute`` up to ``end``; ``target`` adds the scrape's job and instance labels."""
        labels = {**(target or {}), "tenant": tenant, "window": window}
        self.set("tokenbooth_budget_spent_usd", labels, spent, start, end, per_minute)
        self.set("tokenbooth_budget_limit_usd", labels, limit, start, end)
        self.set("tokenbooth_budget_used_ratio", labels, spent / limit, start, end, per_minute / limit)

    def calls(self, c: Calls, start: int = 0, end: int | None = None) -> None:
        """Every series the gateway exports for these calls: requests, latency, TTFT, tokens, cost."""
        who = {"provider": c.provider, "model": c.model}
        failed = {error_type: quantize(n) for error_type, n in c.failed.items()}
        ok = quantize(c.per_minute) - sum(failed.values()) - quantize(c.cancelled)
        slow = quantize(c.slow)
        assert ok >= slow >= 0, "more failed, cancelled or slow calls than calls"
        req = "tokenbooth_requests_total"
        self.add(req, {**who, "operation": "chat", "outcome": "success"}, ok, start, end)
        for error_type, n in failed.items():
            self.add(req, {**who, "operation": "chat", "outcome": "error", "error_type": error_type}, n, start, end)
        if c.cancelled:
            self.add(req, {**who, "operation": "chat", "outcome": "cancelled", "error_type": "cancelled"},
                     c.cancelled, start, end)
        dur = "tokenbooth_request_duration_seconds"
        ok_labels = {**who, "operation": "chat", "outcome": "success"}
        observed = _merge((c.latency, ok - slow), (c.slow_latency, slow))
        self._observe(dur, ok_labels, DURATION_BUCKETS, observed, start, end)
        if c.failed:
            self._observe(dur, {**who, "operation": "chat", "outcome": "error"}, DURATION_BUCKETS,
                          {c.error_latency: sum(failed.values())}, start, end)
        if c.ttft is not None:
            self._observe("tokenbooth_time_to_first_token_seconds", {**who, "operation": "chat"}, TTFT_BUCKETS,
                          {c.ttft: ok}, start, end)
        for kind, n in (("input", c.input_tokens), ("output", c.output_tokens)):
            self.add("tokenbooth_tokens_total", {**who, "operation": "chat", "type": kind}, ok * n, start, end)
        self.add("tokenbooth_cost_usd_total", who, ok * c.cost, start, end)

    def _observe(self, name: str, labels: Mapping[str, str], buckets: tuple[float, ...],
                 observed: Mapping[float, float], start: int, end: int | None) -> None:
        for le in (*buckets, float("inf")):
            n = sum(count for value, count in observed.items() if value <= le)
            self.add(f"{name}_bucket", {**labels, "le": le_label(le)}, n, start, end)
        self.add(f"{name}_count", labels, sum(observed.values()), start, end)
        self.add(f"{name}_sum", labels, sum(v * n for v, n in observed.items()), start, end)

    def input_series(self) -> list[dict[str, Any]]:
        """The series in promtool's ``input_series`` form."""
        out = []
        for key, inc in self._counters.items():
            total, values = 0.0, []
            for step in inc:
                total += step
                values.append(total)
            out.append({"series": key, "values": _compress(list(values), inc)})
        for key, vals in self._gauges.items():
            out.append({"series": key, "values": _compress(vals, self._gauge_steps[key])})
        return out


def _g4(x: float) -> str:
    """Go's ``%.4g``."""
    return f"{x:.4g}"


def humanize_duration(v: float) -> str:
    """Prometheus's ``humanizeDuration`` template function."""
    if v == 0:
        return f"{_g4(v)}s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)
        seconds, minutes, hours, days = whole % 60, whole // 60 % 60, whole // 3600 % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix = p
        v *= 1000
    return f"{_g4(v)}{prefix}s"


_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PRINTF = re.compile(r'printf "%\.(\d)f" \$value')


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Expand an annotation as Prometheus would, for the forms tokenbooth's alerts use."""

    def one(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr.startswith("$labels."):
            return labels.get(expr.removeprefix("$labels."), "<no value>")
        if expr == "$value | humanizePercentage":
            return _g4(value * 100) + "%"
        if expr == "$value | humanizeDuration":
            return humanize_duration(value)
        printf = _PRINTF.fullmatch(expr)
        if printf:
            return f"{value:.{printf.group(1)}f}"
        raise ValueError(f"template form not supported here: {{{{ {expr} }}}}")

    return _TEMPLATE.sub(one, template)
