"""Alert rules (PRODUCT.md F12), built from the thresholds in :class:`~tokenbooth.config.StackConfig`.

Every alert carries ``severity`` (``critical`` pages, ``warning`` goes to chat or a ticket) and
``team`` (``platform``, or ``finance`` for cost and budgets), a ``summary`` and a ``description``; its
runbook is in :mod:`tokenbooth.stack.runbook`. Some alerts come at two severities under one name, so
Alertmanager can inhibit the warning while the critical fires; ``TokenboothBudgetExhausted`` is two
rules under one name (a budget spent, or calls refused for budget), told apart by their labels.

No alert can fire without traffic: ratios only exist when there were calls
(:mod:`~tokenbooth.stack.recording`), and ratio alerts also need ``min_requests`` calls in the window.
Budget gauges only exist for tenants with budgets, once a call of theirs was admitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tokenbooth.config import StackConfig
from tokenbooth.stack.profile import Profile
from tokenbooth.stack.recording import DAY, HOUR, LOOKED_UP, MINUTE, SHORT, RuleNames

__all__ = ["Alert", "AlertSet", "alert_set"]

_PM = "provider, model"
_WHO = "{{ $labels.model }} via {{ $labels.provider }}"
_PCT = "{{ $value | humanizePercentage }}"
_DUR = "{{ $value | humanizeDuration }}"
_INT = '{{ printf "%.0f" $value }}'
_MONEY = '{{ printf "%.2f" $value }}'
_BURN = '{{ printf "%.1f" $value }}'


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


def _num(x: float | Decimal) -> str:
    """A number as PromQL reads it (no exponent for thresholds people write)."""
    return format(Decimal(str(x)).normalize(), "f")


@dataclass(frozen=True)
class Alert:
    """One alerting rule: a name, a PromQL condition, how long it must hold, and what it tells people."""

    name: str
    severity: str
    team: str
    expr: str
    for_: int  # production seconds; scaled by the profile
    summary: str
    description: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def rule(self, profile: Profile) -> dict[str, Any]:
        """The rule as it is written to ``rules/alerts.yml``."""
        out: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_:
            out["for"] = profile.d(self.for_)
        out["labels"] = {"severity": self.severity, "team": self.team, **self.labels}
        out["annotations"] = {"summary": self.summary, "description": self.description}
        return out


@dataclass(frozen=True)
class AlertSet:
    """The alerts in their groups, and the names of the recording rules they read."""

    groups: dict[str, list[Alert]]
    names: RuleNames

    def all(self) -> list[Alert]:
        """Every alert, in file order."""
        return [a for alerts in self.groups.values() for a in alerts]

    def by_name(self, name: str, severity: str | None = None, labels: Mapping[str, str] | None = None) -> Alert:
        """The alert with this name (and severity, or extra labels, for the names that come as two rules)."""
        found = [a for a in self.all()
                 if a.name == name and severity in (None, a.severity) and labels in (None, a.labels)]
        if len(found) != 1:
            raise KeyError(f"{name} ({severity or 'any severity'}, labels {labels}): {len(found)} alerts")
        return found[0]

    def rule_groups(self, profile: Profile) -> list[dict[str, Any]]:
        """The groups as they are written to ``rules/alerts.yml``."""
        return [{"name": g, "rules": [a.rule(profile) for a in alerts]} for g, alerts in self.groups.items()]


def _traffic(s: StackConfig, p: Profile, n: RuleNames) -> list[Alert]:
    w = p.d(SHORT)
    enough = f"and on ({_PM}) {n.requests_rate()} * {_num(p.s(SHORT))} >= {s.min_requests}"
    ttft_enough = (f"and on ({_PM}) sum by ({_PM}) (rate(tokenbooth_time_to_first_token_seconds_count[{w}]))"
                   f" * {_num(p.s(SHORT))} >= {s.min_requests}")
    counted = ("Counted: server errors, rate limits, timeouts, connection, auth and invalid responses; "
               "client mistakes (bad_request, context_length) are not.")
    out = [
        Alert("TokenboothHighErrorRate", sev, "platform", f"{n.failed_ratio()} > {_num(thr)}\n{enough}", 5 * MINUTE,
              f"{_WHO}: {_PCT} of calls failing",
              f"{_PCT} of calls to {_WHO} failed over the last {w} (threshold {_pct(thr)}). {counted}")
        for sev, thr in (("warning", s.error_rate), ("critical", s.error_rate_critical))
    ]
    for q, thr in ((95, s.latency_p95), (99, s.latency_p99)):
        out.append(Alert(
            f"TokenboothHighLatencyP{q}", "warning", "platform", f"{n.latency(q)} > {_num(thr)}\n{enough}",
            10 * MINUTE, f"{_WHO}: P{q} latency {_DUR}",
            f"{q}% of successful calls to {_WHO} took up to {_DUR} over the last {w} "
            f"(threshold {thr:g} s, whole call including streaming)."))
    out.append(Alert(
        "TokenboothSlowTimeToFirstToken", "warning", "platform", f"{n.ttft(95)} > {_num(s.ttft_p95)}\n{ttft_enough}",
        10 * MINUTE, f"{_WHO}: P95 time to first token {_DUR}",
        f"95% of streamed calls to {_WHO} waited up to {_DUR} for their first token over the last {w} "
        f"(threshold {s.ttft_p95:g} s)."))
    for name, types, thr, what in (
        ("TokenboothRateLimited", "rate_limited", s.rate_limited_ratio, "were rate limited (429)"),
        ("TokenboothUpstreamServerErrors", "server_error", s.server_error_ratio, "got a 5xx from the upstream"),
        ("TokenboothUpstreamTimeouts", "timeout_connect|timeout_read", s.timeout_ratio, "timed out"),
    ):
        out.append(Alert(
            name, "warning", "platform",
            f'sum by ({_PM}) ({n.error_type_ratio()}{{error_type=~"{types}"}}) > {_num(thr)}\n{enough}',
            5 * MINUTE, f"{_WHO}: {_PCT} of calls {what}",
            f"{_PCT} of calls to {_WHO} {what} over the last {w} (threshold {_pct(thr)})."))
    out.append(Alert(
        "TokenboothModelDown", "critical", "platform",
        f"{n.failed_rate()} * {_num(p.s(SHORT))} >= {s.min_requests}\n"
        f'unless on ({_PM}) sum by ({_PM}) (rate(tokenbooth_requests_total{{outcome="success"}}[{w}])) > 0',
        2 * MINUTE, f"{_WHO}: every call failing",
        f"{_INT} calls to {_WHO} failed and none succeeded over the last {w}."))
    # The usual rate is the median of the 5-minute rates of the previous day, so the ramp-up of a
    # new series (or of Prometheus itself) does not count; a model needs an hour of history first.
    usual = f"quantile_over_time(0.5, {n.tokens_rate(SHORT)}[{p.d(24 * HOUR)}] offset {p.d(30 * MINUTE)})"
    out.append(Alert(
        "TokenboothTokenSpike", "warning", "platform",
        f"{n.tokens_rate()} * 60 > {_num(s.token_spike_min_per_minute)}\n"
        f"and on ({_PM}) {n.tokens_rate()} > {_num(s.token_spike_factor)} * {usual}\n"
        f"and on ({_PM}) ({n.tokens_rate(SHORT)} offset {p.d(90 * MINUTE)})",
        15 * MINUTE, f"{_WHO}: token use spiking at {_INT} tokens/min",
        f"Input and output tokens of {_WHO} over the last {p.d(30 * MINUTE)} ran at {_INT} tokens/min, more than "
        f"{s.token_spike_factor:g}x the model's usual rate (the median over the previous {p.d(24 * HOUR)})."))
    out.append(Alert(
        "TokenboothInFlightBacklog", "warning", "platform",
        f"sum by ({_PM}) (tokenbooth_in_flight_requests) > {s.in_flight}", 5 * MINUTE,
        f"{_WHO}: {_INT} calls in flight",
        f"{_INT} calls to {_WHO} have been in flight at once for {p.d(5 * MINUTE)} (threshold {s.in_flight}): "
        "the upstream is slowing down or clients are piling up."))
    out.append(Alert(
        "TokenboothToolErrorRate", "warning", "platform",
        f"{n.tool_failed_ratio()} > {_num(s.tool_error_ratio)}\n"
        f"and on (tool) {n.tool_rate()} * {_num(p.s(SHORT))} >= {s.min_requests}",
        10 * MINUTE, "Tool {{ $labels.tool }}: " + _PCT + " of calls failing",
        f"{_PCT} of agent calls to tool {{{{ $labels.tool }}}} ended in error or timeout over the last {w} "
        f"(threshold {_pct(s.tool_error_ratio)})."))
    return out


def _cost(s: StackConfig, fx: Decimal, p: Profile, n: RuleNames) -> list[Alert]:
    cur = s.currency
    to_cur = "" if fx == 1 else f" / {_num(fx)}"  # the metric is in USD; thresholds are in `cur`

    def money(x: Decimal) -> str:
        return f"{cur} {x:.2f}"

    return [
        Alert("TokenboothCostPerHourHigh", "warning", "finance",
              f"sum({n.cost_increase(HOUR)}){to_cur} > {_num(s.cost_per_hour)}", 5 * MINUTE,
              f"LLM spend {cur} {_MONEY} in the last hour",
              f"Priced calls cost {cur} {_MONEY} over the last {p.d(HOUR)}, above the hourly budget of "
              f"{money(s.cost_per_hour)}. Unpriced calls are not included."),
        Alert("TokenboothCostPerDayOverBudget", "warning", "finance",
              f"sum({n.cost_increase(24 * HOUR)}){to_cur} > {_num(s.cost_per_day)}", 5 * MINUTE,
              f"LLM spend {cur} {_MONEY} in the last 24 hours",
              f"Priced calls cost {cur} {_MONEY} over the last {p.d(24 * HOUR)}, above the daily budget of "
              f"{money(s.cost_per_day)}."),
        Alert("TokenboothMonthlyBudgetBurn", "warning", "finance",
              f"sum(rate(tokenbooth_cost_usd_total[{p.d(6 * HOUR)}])) * 2592000{to_cur} > {_num(s.cost_per_month)}",
              30 * MINUTE, f"LLM spend heading for {cur} {_MONEY} a month",
              f"At the rate of the last {p.d(6 * HOUR)}, 30 days of calls would cost {cur} {_MONEY}, above the "
              f"monthly budget of {money(s.cost_per_month)}."),
    ]


# How far ahead TokenboothBudgetBurnRate projects the last 6 hours' spend, by budget window. The
# time left in a calendar window depends on budgets.timezone, which PromQL cannot follow, so the
# horizons are fixed: a day budget is judged on the next 6 hours, a month or total budget on the
# next 3 days (early enough to act, short enough that a 6-hour trend still means something).
BUDGET_HORIZONS = (("day", 6 * HOUR), ("month|total", 3 * DAY))
_TENANT = "Tenant {{ $labels.tenant }}"
_WINDOW = "{{ $labels.window }}"


def _budgets(s: StackConfig, p: Profile) -> list[Alert]:
    used = "max by (tenant, window) (tokenbooth_budget_used_ratio)"
    spent, look = "tokenbooth_budget_spent_usd", p.d(6 * HOUR)
    projected = "\n    or\n".join(
        f'      predict_linear({spent}{{window{"=~" if "|" in w else "="}"{w}"}}[{look}], {_num(p.s(h))})'
        for w, h in BUDGET_HORIZONS)
    horizons = ", ".join(f"{p.d(h)} for a {w.replace('|', ' or ')} budget" for w, h in BUDGET_HORIZONS)
    # Spend only grows within a window: a sample under the window's maximum means the window reset
    # (a new day or month) within the lookback, and a trend across the drop is no trend.
    burn = (f"max by (tenant, window) (\n    (\n{projected}\n    )\n"
            f"  unless\n    {spent} < max_over_time({spent}[{look}])\n)\n"
            "/ on (tenant, window) max by (tenant, window) (tokenbooth_budget_limit_usd) > 1\n"
            f"and on (tenant, window) {used} < 1")
    return [
        Alert("TokenboothBudgetNearlySpent", "warning", "finance", f"{used} >= {_num(s.budget_warning_ratio)}",
              5 * MINUTE, f"{_TENANT}: {_PCT} of its {_WINDOW} budget spent",
              f"{_TENANT} has spent {_PCT} of its {_WINDOW} budget (threshold {_pct(s.budget_warning_ratio)}). "
              "At the limit, a hard budget refuses the tenant's calls until the window resets; a soft one only "
              "counts."),
        Alert("TokenboothBudgetExhausted", "critical", "finance", f"{used} >= 1", 0,
              f"{_TENANT}: {_WINDOW} budget spent ({_PCT})",
              f"{_TENANT} has spent {_PCT} of its {_WINDOW} budget. Over a soft budget its calls go on and are "
              "billed; at a hard one they are refused until the window resets."),
        Alert("TokenboothBudgetExhausted", "critical", "finance",
              f'sum(increase(tokenbooth_rejected_requests_total{{reason="budget"}}[{p.d(SHORT)}])) > 0', 0,
              f"{_INT} calls refused for budget in the last {p.d(SHORT)}",
              f"The gateway refused {_INT} calls over the last {p.d(SHORT)} because they could take a hard budget "
              "of their tenant or key past its limit (HTTP 429, insufficient_quota).", {"reason": "budget"}),
        Alert("TokenboothBudgetBurnRate", "warning", "finance", burn, 30 * MINUTE,
              f"{_TENANT}: {_WINDOW} budget heading for {_PCT} of its limit",
              f"At the rate of the last {look}, tenant {{{{ $labels.tenant }}}}'s {_WINDOW} budget would reach {_PCT} "
              f"of its limit within {horizons}. A window that reset within the last {look} is not projected."),
    ]


# The response cache's hit rate is judged against its own last day, not a fixed target: how much
# traffic repeats is the application's business; a rate that halves means a change broke the reuse.
CACHE_DROP = 0.5  # the hour's hit rate under this share of the previous day's average
CACHE_USUAL_MIN = 0.2  # a usual hit rate under this is too small for its drop to matter


def _cache(s: StackConfig, p: Profile, n: RuleNames) -> list[Alert]:
    usual = f"avg_over_time({n.cache_hit_ratio()}[{p.d(DAY)}] offset {p.d(HOUR)})"
    looked_up = f'sum by (job) (increase(tokenbooth_cache_requests_total{{result=~"{LOOKED_UP}"}}[{p.d(HOUR)}]))'
    return [Alert(
        "TokenboothCacheHitRateDrop", "warning", "platform",
        f"{n.cache_hit_ratio()} < {_num(CACHE_DROP)} * {usual}\nand on (job) {usual} > {_num(CACHE_USUAL_MIN)}\n"
        f"and on (job) {looked_up} >= {s.min_requests}", 15 * MINUTE,
        "{{ $labels.job }}: response cache hit rate down to " + _PCT,
        f"Over the last {p.d(HOUR)} the response cache answered {_PCT} of the calls looked up in it, under "
        f"{_pct(CACHE_DROP)} of its average over the previous {p.d(DAY)}: every miss goes to the upstream and is paid "
        "for. A deploy that changed the requests (a timestamp in a prompt), a new client, the cache's Redis gone, or "
        "a flush.")]


def _platform(s: StackConfig, p: Profile) -> list[Alert]:
    return [
        Alert("TokenboothInstanceDown", "critical", "platform", 'up{job=~"tokenbooth.*"} == 0', 2 * MINUTE,
              "{{ $labels.job }} target {{ $labels.instance }} is down",
              "Prometheus has failed to scrape {{ $labels.instance }} (job {{ $labels.job }}) for "
              f"{p.d(2 * MINUTE)}: no metrics, so no other alert about it can fire."),
        Alert("TokenboothPushgatewayStale", "warning", "platform",
              f"time() - push_time_seconds > {_num(p.s(s.pushgateway_stale))}", 0,
              "Batch job {{ $labels.job }} last pushed metrics " + _DUR + " ago",
              "The Pushgateway's group for job {{ $labels.job }} was last pushed " + _DUR + " ago (threshold "
              f"{p.d(s.pushgateway_stale)}): the job is failing before it pushes, or has stopped."),
        Alert("TokenboothLedgerBehind", "warning", "platform",
              f"max by (job, instance) (tokenbooth_ledger_queue_depth) > {s.ledger_queue}", 5 * MINUTE,
              f"{{{{ $labels.instance }}}}: {_INT} ledger rows waiting to be written",
              f"{_INT} call rows have been queued for the ledger on {{{{ $labels.instance }}}} for {p.d(5 * MINUTE)} "
              f"(threshold {s.ledger_queue}): the database is slow or down, or the gateway takes more calls than its "
              "writer keeps up with. Queued rows live in the gateway's memory until written."),
        Alert("TokenboothLedgerRowsFailed", "critical", "platform",
              f'sum by (job, instance) (increase(tokenbooth_ledger_rows_total{{result="failed"}}[{p.d(10 * MINUTE)}]))'
              " > 0", 0,
              f"{{{{ $labels.instance }}}}: {_INT} ledger rows not written to the database",
              f"{_INT} call rows could not be written to the ledger database on {{{{ $labels.instance }}}} in the "
              f"last {p.d(10 * MINUTE)}: they went to the spill file (see the gateway's log), or were lost if that "
              "failed too."),
        Alert("TokenboothCircuitOpen", "warning", "platform",
              "max by (upstream) (tokenbooth_circuit_state) > 0", 2 * MINUTE,
              "Circuit of upstream {{ $labels.upstream }} is not closed",
              "The circuit breaker of upstream {{ $labels.upstream }} has been open or half-open for "
              f"{p.d(2 * MINUTE)} (state {_INT}: 1 half-open, 2 open): calls to it fail fast or fall back."),
        # tokenbooth_redis_up is 0 in every process without Redis too (an unlabelled gauge starts at 0);
        # the Redis latency histogram only has series where Redis is configured and was tried.
        Alert("TokenboothRedisUnreachable", "critical", "platform",
              "min by (job, instance) (tokenbooth_redis_up) == 0\n"
              "and on (job, instance) count by (job, instance) (tokenbooth_redis_duration_seconds_count)",
              MINUTE, "{{ $labels.instance }}: Redis unreachable, budgets and limits enforced per replica",
              "The gateway on {{ $labels.instance }} has not reached Redis for " + p.d(MINUTE) + ". It keeps "
              "serving: rate and concurrency limits hold per replica, and each hard budget lends this replica at "
              "most redis.outage_credit of its limit (1% by default). Settlements are replayed when Redis answers."),
    ]


# Multiwindow, multi-burn-rate alerts (Google SRE workbook): (long window, short window, burn rate).
_PAGE = ((HOUR, 5 * MINUTE, 14.4), (6 * HOUR, 30 * MINUTE, 6.0))
_TICKET = ((24 * HOUR, 2 * HOUR, 3.0), (72 * HOUR, 6 * HOUR, 1.0))


def _burn(ratio: Callable[[int], str], budget: str, pairs: tuple[tuple[int, int, float], ...]) -> str:
    """Either pair of windows burning the error budget faster than its rate; the value is the burn rate."""
    return "\nor\n".join(f"(\n  {ratio(long)} / {budget} > {rate:g}\nand\n  {ratio(short)} / {budget} > {rate:g}\n)"
                          for long, short, rate in pairs)


def _slo(s: StackConfig, p: Profile, n: RuleNames) -> list[Alert]:
    out = []
    for slo, ratio, target, what in (
        ("availability", n.failed_ratio, s.slo_availability, "calls succeed"),
        ("latency", n.slow_ratio, s.slo_latency_target, f"successful calls finish within {s.slo_latency:g} s"),
    ):
        budget = _num(round(1 - target, 10))
        for severity, pairs, for_ in (("critical", _PAGE, 2 * MINUTE), ("warning", _TICKET, 15 * MINUTE)):
            rule = ", or ".join(f"{rate:g}x over {p.d(long)} and {p.d(short)}" for long, short, rate in pairs)
            out.append(Alert(
                f"Tokenbooth{slo.capitalize()}BurnRate", severity, "platform", _burn(ratio, budget, pairs), for_,
                f"{_WHO}: {slo} error budget burning {_BURN}x too fast",
                f"The objective '{_pct(target)} of {what}' for {_WHO} is spending its error budget {_BURN}x faster "
                f"than it lasts ({rule}).", {"slo": slo}))
    return out


def alert_set(stack: StackConfig, fx: Decimal, profile: Profile) -> AlertSet:
    """Every alert for these thresholds; ``fx`` is USD per unit of ``stack.currency``."""
    names = RuleNames(profile)
    return AlertSet({
        "tokenbooth.alerts.traffic": _traffic(stack, profile, names),
        "tokenbooth.alerts.slo": _slo(stack, profile, names),
        "tokenbooth.alerts.cost": _cost(stack, fx, profile, names),
        "tokenbooth.alerts.budgets": _budgets(stack, profile),
        "tokenbooth.alerts.platform": _platform(stack, profile),
        "tokenbooth.alerts.cache": _cache(stack, profile, names),
    }, names)
