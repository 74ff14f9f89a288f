"""Recording rules, named ``level:metric:operations`` (Prometheus naming practice).

The level is the labels a rule keeps (``provider_model``, ``tool``), the metric is the catalog
metric without ``_total``, the operations say what was done and over which window
(``ratio_rate5m``, ``p95_5m``, ``increase1h``). Alerts and dashboards read these instead of
repeating the raw expressions.

Three guards run through every rule:

- ratios divide by ``(denominator > 0)``, so a model with no calls has no ratio rather than NaN;
- a numerator that may have no series yet (no call has failed) falls back to ``0 * denominator``,
  so a healthy model shows 0 % rather than nothing;
- ``histogram_quantile`` gets ``sum by (le, ...)`` of bucket rates and is dropped when no call
  was observed in the window.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.utils import floatToGoString

from tokenbooth.config import StackConfig
from tokenbooth.stack.profile import Profile, format_duration

__all__ = ["CLIENT_ERRORS", "DAY", "HOUR", "LOOKED_UP", "MINUTE", "SHORT", "SLO_WINDOWS", "RuleNames", "le_label",
           "recording_groups"]

MINUTE = 60
HOUR = 3600
DAY = 86400
SHORT = 5 * MINUTE  # the window of the ratios and quantiles the alerts look at
# Windows of the multiwindow, multi-burn-rate SLO alerts (Google SRE workbook, ch. 5).
SLO_WINDOWS = (5 * MINUTE, 30 * MINUTE, HOUR, 2 * HOUR, 6 * HOUR, DAY, 3 * DAY)
# Calls the caller got wrong are not the service failing: kept out of error ratios and SLOs.
CLIENT_ERRORS = "bad_request|context_length"
LOOKED_UP = "hit|miss|store_skipped"  # the cache results of calls looked up in the cache
_PM = "provider, model"

Rule = dict[str, Any]


def le_label(bound: float) -> str:
    """A bucket bound as client_python writes the ``le`` label: ``30.0``, ``0.25``, ``+Inf``."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class RuleNames:
    """Names of the recording rules for one profile (windows appear in the names)."""

    def __init__(self, profile: Profile) -> None:
        self.p = profile

    def requests_rate(self, window: int = SHORT) -> str:
        """Calls per second, by provider and model."""
        return f"provider_model:tokenbooth_requests:rate{self.p.d(window)}"

    def failed_rate(self, window: int = SHORT) -> str:
        """Failed calls per second (client mistakes left out); 0 when none failed."""
        return f"provider_model:tokenbooth_requests_failed:rate{self.p.d(window)}"

    def failed_ratio(self, window: int = SHORT) -> str:
        """Failed share of calls over ``window``; absent without calls."""
        return f"provider_model:tokenbooth_requests_failed:ratio_rate{self.p.d(window)}"

    def slow_ratio(self, window: int = SHORT) -> str:
        """Share of successful calls slower than ``stack.slo_latency``."""
        return f"provider_model:tokenbooth_requests_slow:ratio_rate{self.p.d(window)}"

    def error_type_ratio(self) -> str:
        """Each error type's share of calls, by provider, model and error_type."""
        return f"provider_model_error_type:tokenbooth_requests_errors:ratio_rate{self.p.d(SHORT)}"

    def latency(self, quantile: int) -> str:
        """A latency quantile (50, 95, 99) of successful calls."""
        return f"provider_model:tokenbooth_request_duration_seconds:p{quantile}_{self.p.d(SHORT)}"

    def ttft(self, quantile: int) -> str:
        """A time-to-first-token quantile (50, 95) of streamed calls."""
        return f"provider_model:tokenbooth_time_to_first_token_seconds:p{quantile}_{self.p.d(SHORT)}"

    def tokens_per_minute(self) -> str:
        """Tokens a minute by provider, model and type."""
        return f"provider_model_type:tokenbooth_tokens:per_minute_{self.p.d(SHORT)}"

    def tokens_rate(self, window: int = 30 * MINUTE) -> str:
        """Input plus output tokens per second."""
        return f"provider_model:tokenbooth_tokens:rate{self.p.d(window)}"

    def cost_increase(self, window: int) -> str:
        """US dollars spent over ``window``."""
        return f"provider_model:tokenbooth_cost_usd:increase{self.p.d(window)}"

    def tool_rate(self) -> str:
        """Agent tool calls per second, by tool."""
        return f"tool:tokenbooth_tool_calls:rate{self.p.d(SHORT)}"

    def tool_failed_ratio(self) -> str:
        """Share of a tool's calls ending in error or timeout."""
        return f"tool:tokenbooth_tool_calls_failed:ratio_rate{self.p.d(SHORT)}"

    def cache_hit_ratio(self) -> str:
        """Share of the calls looked up in the response cache that it answered, by job, over an hour."""
        return f"job:tokenbooth_cache_hits:ratio_rate{self.p.d(HOUR)}"


def _ratio(numerator: str, denominator: str, by: str = _PM) -> str:
    """``numerator / denominator`` that is 0 when nothing failed and absent when nothing happened."""
    return (f"(\n  {numerator}\n  or on ({by}) (0 * {denominator})\n)\n"
            f"/ on ({by})\n({denominator} > 0)")


def _quantile(q: float, metric: str, w: str, selector: str = "") -> str:
    return (f"histogram_quantile({q}, sum by (le, {_PM}) (rate({metric}_bucket{selector}[{w}])))\n"
            f"and on ({_PM}) sum by ({_PM}) (rate({metric}_count{selector}[{w}])) > 0")


def _failed_ratio(names: RuleNames, window: int) -> str:
    w = names.p.d(window)
    total = f"sum by ({_PM}) (rate(tokenbooth_requests_total[{w}]))"
    failed = (f"sum by ({_PM}) (rate(tokenbooth_requests_total"
              f'{{outcome="error",error_type!~"{CLIENT_ERRORS}"}}[{w}]))')
    return _ratio(failed, total)


def _slow_ratio(names: RuleNames, window: int, slo_latency: float) -> str:
    w = names.p.d(window)
    le = le_label(slo_latency)
    count = f'sum by ({_PM}) (rate(tokenbooth_request_duration_seconds_count{{outcome="success"}}[{w}]))'
    fast = (f"sum by ({_PM}) (rate(tokenbooth_request_duration_seconds_bucket"
            f'{{outcome="success",le="{le}"}}[{w}]))')
    return f"(\n  {count}\n  - {fast}\n)\n/ ({count} > 0)"


def recording_groups(stack: StackConfig, profile: Profile) -> list[dict[str, Any]]:
    """The recording rule groups: a fast one at the evaluation interval, a slow one for long windows."""
    n = RuleNames(profile)
    w = profile.d(SHORT)
    fast: list[Rule] = [
        {"record": n.requests_rate(), "expr": f"sum by ({_PM}) (rate(tokenbooth_requests_total[{w}]))"},
        {"record": n.failed_rate(),
         "expr": (f"sum by ({_PM}) (rate(tokenbooth_requests_total"
                  f'{{outcome="error",error_type!~"{CLIENT_ERRORS}"}}[{w}]))\n'
                  f"or on ({_PM}) (0 * {n.requests_rate()})")},
        {"record": n.failed_ratio(), "expr": f"{n.failed_rate()}\n/ ({n.requests_rate()} > 0)"},
        {"record": n.error_type_ratio(),
         "expr": (f'sum by ({_PM}, error_type) (rate(tokenbooth_requests_total{{outcome="error"}}[{w}]))\n'
                  f"/ on ({_PM}) group_left ()\n({n.requests_rate()} > 0)")},
        {"record": n.slow_ratio(), "expr": _slow_ratio(n, SHORT, stack.slo_latency)},
        {"record": n.failed_ratio(30 * MINUTE), "expr": _failed_ratio(n, 30 * MINUTE)},
        {"record": n.slow_ratio(30 * MINUTE), "expr": _slow_ratio(n, 30 * MINUTE, stack.slo_latency)},
    ]
    for q in (50, 95, 99):
        fast.append({"record": n.latency(q), "expr": _quantile(
            q / 100, "tokenbooth_request_duration_seconds", w, '{outcome="success"}')})
    for q in (50, 95):
        fast.append({"record": n.ttft(q), "expr": _quantile(q / 100, "tokenbooth_time_to_first_token_seconds", w)})
    fast += [
        {"record": n.tokens_per_minute(),
         "expr": f"sum by ({_PM}, type) (rate(tokenbooth_tokens_total[{w}])) * 60"},
        # input and output include their cached and reasoning parts: their sum is every token.
        *({"record": n.tokens_rate(window), "expr": (f"sum by ({_PM}) (rate(tokenbooth_tokens_total"
                                                     f'{{type=~"input|output"}}[{profile.d(window)}]))')}
          for window in (SHORT, 30 * MINUTE)),
        {"record": n.cost_increase(HOUR),
         "expr": f"sum by ({_PM}) (increase(tokenbooth_cost_usd_total[{profile.d(HOUR)}]))"},
        {"record": n.tool_rate(), "expr": f"sum by (tool) (rate(tokenbooth_tool_calls_total[{w}]))"},
        {"record": n.tool_failed_ratio(), "expr": _ratio(
            f'sum by (tool) (rate(tokenbooth_tool_calls_total{{status=~"error|timeout"}}[{w}]))',
            n.tool_rate(), by="tool")},
        # bypassed calls (samples, no-cache) were never candidates: the ratio is of the calls looked up
        {"record": n.cache_hit_ratio(), "expr": _ratio(
            f'sum by (job) (rate(tokenbooth_cache_requests_total{{result="hit"}}[{profile.d(HOUR)}]))',
            f'sum by (job) (rate(tokenbooth_cache_requests_total{{result=~"{LOOKED_UP}"}}[{profile.d(HOUR)}]))',
            by="job")},
    ]
    slow: list[Rule] = []
    for window in SLO_WINDOWS[2:]:
        slow.append({"record": n.failed_ratio(window), "expr": _failed_ratio(n, window)})
        slow.append({"record": n.slow_ratio(window), "expr": _slow_ratio(n, window, stack.slo_latency)})
    slow.append({"record": n.cost_increase(DAY),
                 "expr": f"sum by ({_PM}) (increase(tokenbooth_cost_usd_total[{profile.d(DAY)}]))"})
    return [
        {"name": "tokenbooth.recording", "rules": fast},
        {"name": "tokenbooth.recording.slow", "interval": format_duration(profile.slow_interval),
         "rules": slow},
    ]
