"""``promtool test rules`` unit tests for every alert, generated for the thresholds they test.

Each alert gets a fault case: healthy traffic, the fault it is for, healthy traffic again; the
test checks it is silent before, fires with its exact labels and annotations during, and is
resolved after. Two shared cases keep every alert silent: healthy traffic (small error rates
under every threshold, client mistakes over them, a model with no error series at all) and no
traffic (every series present and flat; no budget gauges, and Redis not configured). Faults are
sized from the thresholds, so the tests written next to a user's rules test that user's numbers.

Series are sampled every minute; rules are evaluated every 30 minutes (every fault lasts long
enough for its ``for:``), which keeps the whole file to a few seconds of promtool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tokenbooth.catalog import DURATION_BUCKETS, TTFT_BUCKETS
from tokenbooth.config import StackConfig
from tokenbooth.stack.alerts import BUDGET_HORIZONS, Alert, AlertSet
from tokenbooth.stack.recording import recording_groups
from tokenbooth.stack.series import Calls, Timeline, quantize, render

__all__ = ["rule_tests"]

GPT = {"provider": "openai", "model": "gpt-4o"}
GATEWAY = {"job": "tokenbooth", "instance": "gateway:8080"}
REPLICA = {"job": "tokenbooth", "instance": "gateway-2:8080"}


@dataclass(frozen=True)
class Expect:
    """One alert expected to fire: the labels its expression keeps and its value."""

    alert: Alert
    labels: dict[str, str]
    value: float

    def promtool(self) -> dict[str, Any]:
        labels = {**self.labels, "severity": self.alert.severity, "team": self.alert.team, **self.alert.labels}
        return {"exp_labels": labels, "exp_annotations": {
            "summary": render(self.alert.summary, self.labels, self.value),
            "description": render(self.alert.description, self.labels, self.value)}}


@dataclass
class Case:
    """One promtool test group: a timeline and what each alert does at given minutes."""

    name: str
    timeline: Timeline
    checks: list[tuple[int, str, list[Expect]]] = field(default_factory=list)
    exprs: list[tuple[int, str, list[tuple[str, float]]]] = field(default_factory=list)

    def fault(self, alertname: str, before: int | None, fire: int, after: int, expects: list[Expect]) -> Case:
        if before is not None:
            self.checks.append((before, alertname, []))
        self.checks += [(fire, alertname, expects), (after, alertname, [])]
        return self

    def promtool(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "interval": "1m", "input_series": self.timeline.input_series(),
                               "alert_rule_test": [
                                   {"eval_time": f"{m}m", "alertname": name, "exp_alerts": [e.promtool() for e in exp]}
                                   for m, name, exp in self.checks]}
        if self.exprs:
            out["promql_expr_test"] = [
                {"expr": expr, "eval_time": f"{m}m", "exp_samples": [{"labels": lb, "value": v} for lb, v in samples]}
                for m, expr, samples in self.exprs]
        return out


def _nice(x: float) -> float:
    return float(f"{x:.3g}")


def _above(threshold: float) -> float:
    """A share clearly over a ratio threshold (and at most 1)."""
    return _nice(min(2 * threshold, (threshold + 1) / 2))


def _bucket_below(threshold: float, buckets: Sequence[float]) -> float:
    """An observation whose bucket lies wholly under ``threshold`` (quantiles stay under it)."""
    return max(b for b in buckets if b < threshold)


def _bucket_above(threshold: float, buckets: Sequence[float]) -> tuple[float, float]:
    """An observation whose bucket lies wholly over ``threshold``: (its bucket's lower bound, the value)."""
    lo = min(b for b in buckets if b >= threshold)
    return lo, buckets[buckets.index(lo) + 1]


def _volume(s: StackConfig) -> float:
    """Calls a minute: a round number (exact ratios), over ``min_requests`` in any 5-minute window."""
    return 1000.0 * max(1, math.ceil(s.min_requests / 1000))


def _three_phases(minutes: int, start: int, end: int, healthy: Calls, faulty: Calls) -> Timeline:
    t = Timeline(minutes)
    t.calls(healthy, 0, start)
    t.calls(faulty, start, end)
    t.calls(healthy, end, minutes)
    return t


def _traffic_cases(a: AlertSet, s: StackConfig) -> list[Case]:
    v = _volume(s)
    ok = Calls(v, latency=_bucket_below(min(s.latency_p95, s.latency_p99), DURATION_BUCKETS),
               ttft=_bucket_below(s.ttft_p95, TTFT_BUCKETS))
    cases = []
    name = "TokenboothHighErrorRate"
    for severity, share in (("warning", _nice((s.error_rate + s.error_rate_critical) / 2)),
                            ("critical", _above(s.error_rate_critical))):
        faulty = Calls(v, failed={"server_error": share * v}, latency=ok.latency, ttft=ok.ttft)
        value = quantize(share * v) / v
        firing = [Expect(a.by_name(name, "warning"), GPT, value)]
        if severity == "critical":
            firing.append(Expect(a.by_name(name, "critical"), GPT, value))
        cases.append(Case(f"{name} {severity}: {share:.1%} of calls fail", _three_phases(180, 30, 120, ok, faulty))
                     .fault(name, 30, 90, 150, firing))
    for q, threshold in ((95, s.latency_p95), (99, s.latency_p99)):
        lo, value = _bucket_above(threshold, DURATION_BUCKETS)
        faulty = Calls(v, latency=value, ttft=ok.ttft)
        name = f"TokenboothHighLatencyP{q}"
        cases.append(Case(f"{name}: calls take {value:g} s", _three_phases(180, 30, 120, ok, faulty))
                     .fault(name, 30, 90, 150, [Expect(a.by_name(name), GPT, lo + (value - lo) * q / 100)]))
    lo, value = _bucket_above(s.ttft_p95, TTFT_BUCKETS)
    name = "TokenboothSlowTimeToFirstToken"
    cases.append(Case(f"{name}: first tokens after {value:g} s",
                      _three_phases(180, 30, 120, ok, Calls(v, latency=ok.latency, ttft=value)))
                 .fault(name, 30, 90, 150, [Expect(a.by_name(name), GPT, lo + (value - lo) * 0.95)]))
    for name, threshold, types in (("TokenboothRateLimited", s.rate_limited_ratio, ("rate_limited",)),
                                   ("TokenboothUpstreamServerErrors", s.server_error_ratio, ("server_error",)),
                                   ("TokenboothUpstreamTimeouts", s.timeout_ratio,
                                    ("timeout_connect", "timeout_read"))):
        share = _above(threshold)
        faulty = Calls(v, failed={t: share * v / len(types) for t in types}, latency=ok.latency, ttft=ok.ttft)
        value = sum(quantize(share * v / len(types)) for _ in types) / v
        cases.append(Case(f"{name}: {share:.1%} of calls", _three_phases(180, 30, 120, ok, faulty))
                     .fault(name, 30, 90, 150, [Expect(a.by_name(name), GPT, value)]))
    name = "TokenboothModelDown"
    down = Calls(v, failed={"server_error": v})
    cases.append(Case(f"{name}: every call fails", _three_phases(180, 30, 120, ok, down))
                 .fault(name, 30, 90, 150, [Expect(a.by_name(name), GPT, 5 * v)]))
    cases.append(_token_spike(a, s, v))
    t = Timeline(180)
    t.set("tokenbooth_in_flight_requests", GPT, s.in_flight / 4, 0, 29)
    t.set("tokenbooth_in_flight_requests", GPT, 2 * s.in_flight, 30, 119)
    t.set("tokenbooth_in_flight_requests", GPT, s.in_flight / 4, 120)
    name = "TokenboothInFlightBacklog"
    cases.append(Case(f"{name}: {2 * s.in_flight} calls in flight", t)
                 .fault(name, 30, 90, 150, [Expect(a.by_name(name), GPT, 2 * s.in_flight)]))
    share = _above(s.tool_error_ratio)
    t = Timeline(180)
    tool = {"tool": "web_search"}
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "success"}, v)
    half = quantize(share * v / 2)
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "success"}, -2 * half, 30, 120)
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "error"}, half, 30, 120)
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "timeout"}, half, 30, 120)
    name = "TokenboothToolErrorRate"
    cases.append(Case(f"{name}: {share:.1%} of tool calls fail", t)
                 .fault(name, 30, 90, 150, [Expect(a.by_name(name), tool, 2 * half / v)]))
    return cases


def _token_spike(a: AlertSet, s: StackConfig, v: float) -> Case:
    per_call = max(1200.0, 2 * s.token_spike_min_per_minute / v)
    times = max(10.0, math.ceil(3 * s.token_spike_factor))
    usual = Calls(v, input_tokens=per_call * 5 / 6, output_tokens=per_call / 6)
    spike = Calls(v, input_tokens=usual.input_tokens * times, output_tokens=usual.output_tokens * times)
    name = "TokenboothTokenSpike"
    case = Case(f"{name}: {times:g}x the usual tokens for an hour", _three_phases(330, 180, 240, usual, spike))
    case.checks.append((60, name, []))  # less than an hour of history: no judgement yet
    value = quantize(v * spike.input_tokens) + quantize(v * spike.output_tokens)  # tokens a minute
    return case.fault(name, 150, 240, 300, [Expect(a.by_name(name), GPT, value)])


def _cost_cases(a: AlertSet, s: StackConfig, fx: Decimal) -> list[Case]:
    usd = float(fx)
    cases = []
    for name, budget, start, end, window, checks in (
        ("TokenboothCostPerHourHigh", s.cost_per_hour, 60, 180, 60, (30, 150, 270)),
        ("TokenboothCostPerDayOverBudget", s.cost_per_day, 60, 180, 120, (30, 210, 1650)),
        ("TokenboothMonthlyBudgetBurn", s.cost_per_month, 60, 480, 43200, (30, 420, 720)),
    ):
        # Twice the budget over `window` minutes: an hour, a burst of two hours, a 30-day month.
        t = Timeline(checks[-1])
        per_minute = quantize(2 * float(budget) * usd / window)
        t.add("tokenbooth_cost_usd_total", GPT, 0)
        t.add("tokenbooth_cost_usd_total", GPT, per_minute, start, end)
        value = per_minute * window / usd
        cases.append(Case(f"{name}: spending twice the budget", t)
                     .fault(name, checks[0], checks[1], checks[2], [Expect(a.by_name(name), {}, value)]))
    return cases


def _budget_cases(a: AlertSet, s: StackConfig) -> list[Case]:
    cases = []
    acme = {"tenant": "acme", "window": "month"}
    limit = 1000.0
    for name, share in (("TokenboothBudgetNearlySpent", _above(s.budget_warning_ratio)),
                        ("TokenboothBudgetExhausted", 1.25)):  # a soft budget, a quarter over
        t = Timeline(150)
        t.budget("acme", "month", limit, limit * s.budget_warning_ratio / 2, 0, 29, target=GATEWAY)
        t.budget("acme", "month", limit, limit * share, 30, 89, target=GATEWAY)
        t.budget("acme", "month", limit, 0.0, 90, target=GATEWAY)  # the month turns
        cases.append(Case(f"{name}: {share:.0%} of a month budget spent, then the month turns", t)
                     .fault(name, 0, 60, 120, [Expect(a.by_name(name, labels={}), acme, share)]))
    t = Timeline(150)
    refused = {**GATEWAY, "reason": "budget"}
    t.add("tokenbooth_rejected_requests_total", refused, 0)
    t.add("tokenbooth_rejected_requests_total", refused, 2, 30, 90)
    t.add("tokenbooth_rejected_requests_total", {**GATEWAY, "reason": "rate_limit"}, 5)  # not a budget
    name = "TokenboothBudgetExhausted"
    cases.append(Case(f"{name}: the gateway refuses 2 calls a minute for budget", t)
                 .fault(name, 0, 60, 120, [Expect(a.by_name(name, labels={"reason": "budget"}), {}, 10.0)]))
    horizon = {w: h / 60 for w, h in BUDGET_HORIZONS}  # minutes
    name = "TokenboothBudgetBurnRate"
    # A month budget: a tenth spent, then 0.5 USD a minute for 7 hours (3 days of that is 2160 USD).
    t = Timeline(900)
    t.budget("acme", "month", limit, 100.0, 0, 60, target=GATEWAY)
    t.budget("acme", "month", limit, 100.0, 60, 480, 0.5, target=GATEWAY)
    t.budget("acme", "month", limit, 310.0, 480, target=GATEWAY)  # the spending stops
    value = (280.0 + 0.5 * horizon["month|total"]) / limit
    cases.append(Case(f"{name}: a month budget spending 0.5 USD a minute", t)
                 .fault(name, 30, 420, 900, [Expect(a.by_name(name), acme, value)]))
    # A day budget of 100 USD: 10 spent by 17:00, then a burst until midnight, when the day turns
    # and the gauge drops: the fall is a new window, not spending going backwards.
    day = {"tenant": "acme", "window": "day"}
    t = Timeline(1800)
    t.budget("acme", "day", 100.0, 10.0, 0, 1020, target=GATEWAY)
    t.budget("acme", "day", 100.0, 10.0, 1020, 1439, 0.1875, target=GATEWAY)
    t.budget("acme", "day", 100.0, 0.0, 1440, None, 0.03125, target=GATEWAY)
    value = (10.0 + 0.1875 * (390 + horizon["day"])) / 100.0
    case = Case(f"{name}: a day budget bursting until midnight, then the day turns", t)
    case.checks.append((1800, name, []))
    cases.append(case.fault(name, 990, 1410, 1440, [Expect(a.by_name(name), day, value)]))
    return cases


def _platform_cases(a: AlertSet, s: StackConfig) -> list[Case]:
    cases = []
    for name, metric, labels, bad in (
        ("TokenboothInstanceDown", "up", GATEWAY, 0.0),
        ("TokenboothCircuitOpen", "tokenbooth_circuit_state", {"upstream": "primary"}, 2.0),
        ("TokenboothLedgerBehind", "tokenbooth_ledger_queue_depth", GATEWAY, 2.0 * s.ledger_queue),
        ("TokenboothRedisUnreachable", "tokenbooth_redis_up", GATEWAY, 0.0),
    ):
        t = Timeline(120)
        if metric == "tokenbooth_redis_up":  # Redis is configured on both replicas; one loses it
            _redis(t, GATEWAY)
            _redis(t, REPLICA)
        good = 1.0 if metric in ("up", "tokenbooth_redis_up") else 0.0
        t.set(metric, labels, good, 0, 29)
        t.set(metric, labels, bad, 30, 89)
        t.set(metric, labels, good, 90)
        cases.append(Case(f"{name}: {metric} is {bad:g} for an hour", t)
                     .fault(name, 0, 60, 90, [Expect(a.by_name(name), labels, bad)]))
    t = Timeline(150)
    failed = {**GATEWAY, "result": "failed"}
    t.set("tokenbooth_ledger_rows_total", failed, 0, 0, 24)
    for m in range(25, 151):  # 200 rows fail in minutes 25-29; rules are evaluated every 30 minutes
        t.set("tokenbooth_ledger_rows_total", failed, 40.0 * min(m - 24, 5), m, m)
    name = "TokenboothLedgerRowsFailed"
    cases.append(Case(f"{name}: 200 rows spilled in five minutes", t)
                 .fault(name, 0, 30, 60, [Expect(a.by_name(name), GATEWAY, 200.0)]))
    stale = s.pushgateway_stale / 60  # minutes
    every = _push_every(s)
    last = every * math.ceil(stale / every)
    fire = 30 * math.ceil((last + stale + 1) / 30)
    resume = fire + 30
    t = Timeline(resume + 30)
    job = {"job": "nightly-report"}
    for m in range(resume + 31):
        if last < m < resume:  # the job stopped pushing
            pushed = last
        else:
            since = 0 if m <= last else resume
            pushed = since + (m - since) // every * every
        t.set("push_time_seconds", job, pushed * 60.0, m, m)
    name = "TokenboothPushgatewayStale"
    cases.append(Case(f"{name}: no push for {fire - last} minutes", t)
                 .fault(name, last, fire, resume + 30, [Expect(a.by_name(name), job, (fire - last) * 60.0)]))
    return cases


def _cache_calls(t: Timeline, hit_share: float, per_minute: float, start: int = 0, end: int | None = None) -> None:
    """Calls looked up in the response cache of GATEWAY, ``hit_share`` of them answered from it."""
    t.add("tokenbooth_cache_requests_total", {**GATEWAY, "result": "hit"}, per_minute * hit_share, start, end)
    t.add("tokenbooth_cache_requests_total", {**GATEWAY, "result": "miss"}, per_minute * (1 - hit_share), start, end)
    t.add("tokenbooth_cache_requests_total", {**GATEWAY, "result": "bypass"}, per_minute, start, end)


def _cache_cases(a: AlertSet) -> list[Case]:
    t = Timeline(600)
    _cache_calls(t, 0.7, 100, 0, 360)  # a day's usual (here: six hours; the average needs no more)
    _cache_calls(t, 0.2, 100, 360, 480)  # a deploy breaks the reuse for two hours
    _cache_calls(t, 0.7, 100, 480, 600)
    name = "TokenboothCacheHitRateDrop"
    return [Case(f"{name}: the hit rate falls from 70% to 20% for two hours", t)
            .fault(name, 330, 450, 540, [Expect(a.by_name(name), {"job": GATEWAY["job"]}, 0.2)])]


def _redis(t: Timeline, target: dict[str, str]) -> None:
    """A gateway with Redis configured and answering: its latency histogram has series (admit calls)."""
    for le in ("0.001", "+Inf"):
        t.add("tokenbooth_redis_duration_seconds_bucket", {**target, "operation": "admit", "le": le}, 100)
    t.add("tokenbooth_redis_duration_seconds_count", {**target, "operation": "admit"}, 100)
    t.add("tokenbooth_redis_duration_seconds_sum", {**target, "operation": "admit"}, 0.05)
    t.set("tokenbooth_redis_up", target, 1.0)


def _slo_cases(a: AlertSet, s: StackConfig) -> list[Case]:
    v = _volume(s)
    cases = []
    for slo, target in (("availability", s.slo_availability), ("latency", s.slo_latency_target)):
        name = f"Tokenbooth{slo.capitalize()}BurnRate"
        budget = round(1 - target, 10)
        for burn, minutes, expected in (
            (20.0, 450, ("critical", "warning")),  # pages, and tickets too
            (2.0, 210, ("warning",)),  # tickets only
        ):
            share = quantize(burn * budget * v) / v
            fast = max(b for b in DURATION_BUCKETS if b <= s.slo_latency)
            if slo == "availability":
                faulty = Calls(v, failed={"server_error": share * v}, latency=fast)
            else:
                slow = _bucket_above(s.slo_latency, DURATION_BUCKETS)[1]
                faulty = Calls(v, latency=fast, slow=share * v, slow_latency=slow)
            # The fault runs from the start for 90 minutes: every window sees the same ratio.
            t = Timeline(minutes)
            t.calls(faulty, 0, 90)
            t.calls(Calls(v, latency=fast), 90, minutes)
            case = Case(f"{name}: burning the budget {burn:g}x for 90 minutes", t)
            if burn > 6:  # the page resolves first; the ticket's 2h/1d windows still hold the fault
                case.checks.append((150, name, [Expect(a.by_name(name, "warning"), GPT, share / budget * 90 / 150)]))
            cases.append(case.fault(name, None, 60, minutes,
                                    [Expect(a.by_name(name, sev), GPT, share / budget) for sev in expected]))
    return cases


def _healthy(a: AlertSet, s: StackConfig, fx: Decimal) -> Case:
    v = _volume(s)
    small = min(s.error_rate, s.rate_limited_ratio, s.server_error_ratio, s.timeout_ratio, 1 - s.slo_availability) / 4
    hourly = min(float(s.cost_per_hour), float(s.cost_per_day) / 24, float(s.cost_per_month) / 720) / 4 * float(fx)
    latency = _bucket_below(min(s.latency_p95, s.latency_p99, s.slo_latency * 1.0001), DURATION_BUCKETS)
    ttft = _bucket_below(s.ttft_p95, TTFT_BUCKETS)
    t = Timeline(480)
    # Client mistakes over the error-rate threshold: not failures of the service, so no alert.
    client = _nice(min(0.5, (s.error_rate + s.error_rate_critical) / 2))
    t.calls(Calls(v, failed={"server_error": small * v / 3, "rate_limited": small * v / 3,
                             "timeout_read": small * v / 3, "bad_request": client * v},
                  cancelled=0.01 * v, latency=latency, ttft=ttft, cost=hourly / 60 / (v * (0.99 - client - small))))
    t.calls(Calls(v / 2, model="deepseek-chat", provider="deepseek", latency=latency, ttft=None))
    tool = {"tool": "web_search"}
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "success"}, v / 10 * (1 - s.tool_error_ratio / 4))
    t.add("tokenbooth_tool_calls_total", {**tool, "status": "error"}, v / 10 * s.tool_error_ratio / 4)
    t.set("tokenbooth_in_flight_requests", GPT, s.in_flight / 4)
    t.set("tokenbooth_circuit_state", {"upstream": "primary"}, 0)
    t.set("tokenbooth_ledger_queue_depth", GATEWAY, s.ledger_queue / 2)
    t.add("tokenbooth_ledger_rows_total", {**GATEWAY, "result": "written"}, v)
    t.set("tokenbooth_ledger_rows_total", {**GATEWAY, "result": "failed"}, 0)
    t.set("up", GATEWAY, 1)
    t.set("up", {"job": "tokenbooth-pushgateway", "instance": "pushgateway:9091"}, 1)
    # Budgets well under the warning, spending slowly enough that no projection reaches the limit.
    w = s.budget_warning_ratio
    t.budget("acme", "month", 1000.0, 250.0 * w, 0, None, 250.0 * w / (480 + 4320), target=GATEWAY)
    t.budget("acme", "day", 100.0, 25.0 * w, 0, None, 25.0 * w / (480 + 360), target=GATEWAY)
    t.budget("beta", "total", 50.0, 25.0 * w, target=GATEWAY)
    t.add("tokenbooth_rejected_requests_total", {**GATEWAY, "reason": "budget"}, 0)
    t.add("tokenbooth_rejected_requests_total", {**GATEWAY, "reason": "rate_limit"}, 5)
    _cache_calls(t, 0.6, v)
    _redis(t, GATEWAY)
    _redis(t, REPLICA)
    every = _push_every(s)
    for m in range(481):
        t.set("push_time_seconds", {"job": "nightly-report"}, (m - m % every) * 60.0, m, m)
    case = Case("healthy traffic: every alert silent", t)
    case.exprs.append((240, a.names.failed_ratio() + '{model="deepseek-chat"}',
                       [(a.names.failed_ratio() + '{provider="deepseek",model="deepseek-chat"}', 0.0)]))
    return _silent(case, a, (30, 240, 480))


def _no_traffic(a: AlertSet) -> Case:
    t = Timeline(360)
    t.calls(Calls(0, failed={"server_error": 0}))
    t.add("tokenbooth_tool_calls_total", {"tool": "web_search", "status": "error"}, 0)
    t.set("tokenbooth_in_flight_requests", GPT, 0)
    t.set("tokenbooth_circuit_state", {"upstream": "primary"}, 0)
    t.set("tokenbooth_ledger_queue_depth", GATEWAY, 0)
    t.set("tokenbooth_ledger_rows_total", {**GATEWAY, "result": "failed"}, 0)
    t.set("up", GATEWAY, 1)
    # Without Redis the gateway still exports tokenbooth_redis_up, at 0, and no Redis latency.
    t.set("tokenbooth_redis_up", GATEWAY, 0)
    t.add("tokenbooth_rejected_requests_total", {**GATEWAY, "reason": "budget"}, 0)
    _cache_calls(t, 0.5, 0)
    case = Case("no traffic: every alert silent, no ratio or quantile (no NaN)", t)
    n = a.names
    for expr in (n.failed_ratio(), n.failed_ratio(3 * 86400), n.slow_ratio(), n.error_type_ratio(), n.latency(95),
                 n.ttft(95), n.tool_failed_ratio(), n.cache_hit_ratio()):
        case.exprs.append((120, expr, []))
    return _silent(case, a, (30, 120, 360))


def _trickle(a: AlertSet) -> Case:
    t = Timeline(120)
    t.calls(Calls(0.2, model="gpt-4o-mini", failed={"server_error": 0.2}))  # one failing call every 5 minutes
    case = Case("a trickle of failing calls stays under min_requests", t)
    for name in ("TokenboothHighErrorRate", "TokenboothUpstreamServerErrors", "TokenboothModelDown"):
        case.checks += [(60, name, []), (120, name, [])]
    return case


def _push_every(s: StackConfig) -> int:
    """Minutes between a batch job's pushes: a multiple of the 30-minute step, under the threshold."""
    return 30 * max(1, int(s.pushgateway_stale / 60 // 60))


def _silent(case: Case, a: AlertSet, minutes: Sequence[int]) -> Case:
    for name in dict.fromkeys(alert.name for alert in a.all()):
        case.checks += [(m, name, []) for m in minutes]
    return case


def rule_tests(alerts: AlertSet, stack: StackConfig, fx: Decimal, rule_files: Sequence[str]) -> dict[str, Any]:
    """The promtool test file for these alerts (built with the production profile) and thresholds."""
    if alerts.names.p.scale != 1:
        raise ValueError("rule tests are written for the production profile")
    cases = [*_traffic_cases(alerts, stack), *_cost_cases(alerts, stack, fx), *_budget_cases(alerts, stack),
             *_platform_cases(alerts, stack), *_cache_cases(alerts),
             *_slo_cases(alerts, stack), _healthy(alerts, stack, fx), _no_traffic(alerts)]
    if stack.min_requests > 1:
        cases.append(_trickle(alerts))
    order = [g["name"] for g in recording_groups(stack, alerts.names.p)] + list(alerts.groups)
    # Recording rules before the alerts that read them, as in one evaluation of Prometheus.
    return {"rule_files": list(rule_files), "evaluation_interval": "30m", "group_eval_order": order,
            "tests": [c.promtool() for c in cases]}
