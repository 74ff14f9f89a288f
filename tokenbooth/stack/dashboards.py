"""Grafana dashboards as code (PRODUCT.md F14), built with Grafana Labs' ``grafana-foundation-sdk``.

Four dashboards: *overview* (traffic, success, latency, TTFT, tokens, cost, errors), *cost and
tenants* (budgets included), *agents* and *gateway internals* (Redis included). Every panel and
variable uses the provisioned data source (``uid: tokenbooth-prometheus``); every query reads
catalog metrics or the recording rules of :mod:`tokenbooth.stack.recording`.

The JSON ships in ``tokenbooth/stack/grafana/``, so ``stack init`` needs no SDK; after a change
here, regenerate it with ``python -m tokenbooth.stack.dashboards`` (a test checks they match).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, ReduceDataOptions, StackingConfig
from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, QueryVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphTresholdsStyleMode, StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

from tokenbooth.config import StackConfig
from tokenbooth.stack.compose import DATASOURCE_UID
from tokenbooth.stack.profile import PRODUCTION
from tokenbooth.stack.recording import HOUR, RuleNames

__all__ = ["SHIPPED", "build_dashboards", "write_dashboards"]

SHIPPED = Path(__file__).parent / "grafana"
DS = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
N = RuleNames(PRODUCTION)
F = 'provider=~"$provider",model=~"$model"'  # the overview's and cost dashboard's filters
RI = "$__rate_interval"

Panel = timeseries.Panel | stat.Panel | bargauge.Panel | statetimeline.Panel


def _target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def ts(title: str, queries: list[tuple[str, str]], unit: str, description: str, span: int = 12,
       stacked: bool = False) -> timeseries.Panel:
    """A time series panel; ``queries`` are (PromQL, legend) pairs."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(span)
             .height(8).fill_opacity(10 if not stacked else 40))
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + i)))
    return panel


def single(title: str, expr: str, unit: str, description: str, time_from: str | None = None,
           span: int = 6) -> stat.Panel:
    """A single-value panel; ``time_from`` like ``now/d`` makes ``$__range`` "today so far"."""
    panel = (stat.Panel().title(title).description(description).datasource(DS).unit(unit).span(span).height(4)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .with_target(_target(expr, "", "A").instant()))
    return panel.time_from(time_from) if time_from else panel


def bars(title: str, expr: str, legend: str, unit: str, description: str, span: int = 12) -> bargauge.Panel:
    """A bar gauge over one instant query (a breakdown for the selected time range)."""
    return (bargauge.Panel().title(title).description(description).datasource(DS).unit(unit).span(span).height(8)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .with_target(_target(expr, legend, "A").instant()))


def _variable(name: str, metric: str, label: str | None = None) -> QueryVariable:
    return (QueryVariable(name).label(name.capitalize()).datasource(DS)
            .query(f"label_values({metric}, {label or name})").multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))


def _dashboard(uid: str, title: str, description: str, variables: list[QueryVariable],
               rows: list[tuple[str, list[Panel]]]) -> dict[str, Any]:
    board = (Dashboard(title).uid(uid).description(description).tags(["tokenbooth"]).refresh("30s")
             .time("now-6h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
             .link(DashboardLink("tokenbooth").type(DashboardLinkType.DASHBOARDS).tags(["tokenbooth"])
                   .as_dropdown(True).include_vars(True).keep_time(True)))
    for v in variables:
        board = board.with_variable(v)
    panel_id = 0
    for row_title, panels in rows:
        panel_id += 1
        board = board.with_row(Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    data: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder, sort_keys=True))
    data["templating"] = {"list": data.get("templating", {}).get("list", [])}
    for variable in data["templating"]["list"]:
        variable.pop("id", None)  # the SDK's all-zero placeholder
    data["annotations"] = {"list": []}
    for panel in data["panels"]:
        if panel.get("options") is None:
            panel["options"] = {}  # Grafana fills in defaults for {}, not for null
    return data


def _q(q: float, metric: str, selector: str, by: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{selector}}}[{RI}])))"


def overview() -> dict[str, Any]:
    """Traffic, success, latency, TTFT, tokens, cost today and this month, errors, traffic by model."""
    req = f"tokenbooth_requests_total{{{F}}}"
    dur = "tokenbooth_request_duration_seconds"
    ttft = "tokenbooth_time_to_first_token_seconds"
    rows: list[tuple[str, list[Panel]]] = [
        ("Now", [
            single("Requests per second", f"sum(rate({req}[{RI}]))", "reqps", "Calls through the gateway."),
            single("Success rate", f'sum(rate(tokenbooth_requests_total{{{F},outcome="success"}}[{RI}])) / '
                   f"(sum(rate({req}[{RI}])) > 0)", "percentunit", "Share of calls that succeeded."),
            single("Cost today", f"sum(increase(tokenbooth_cost_usd_total{{{F}}}[$__range]))", "currencyUSD",
                   "Priced calls since midnight (dashboard time zone); unpriced calls are not included.", "now/d"),
            single("Cost this month", f"sum(increase(tokenbooth_cost_usd_total{{{F}}}[$__range]))", "currencyUSD",
                   "Priced calls since the first of the month.", "now/M"),
        ]),
        ("Traffic", [
            ts("Requests per second by model", [(f"sum by (model) (rate({req}[{RI}]))", "{{model}}")], "reqps",
               "Calls per second, by the model the caller asked for.", stacked=True),
            ts("Success rate by model", [(f'sum by (model) (rate(tokenbooth_requests_total{{{F},outcome="success"}}'
                                          f"[{RI}])) / (sum by (model) (rate({req}[{RI}])) > 0)", "{{model}}")],
               "percentunit", "Share of calls that succeeded; a gap means no calls."),
        ]),
        ("Latency", [
            ts("Latency P50 / P95 / P99", [(_q(q, dur, f'{F},outcome="success"'), f"P{round(q * 100)}")
                                           for q in (0.5, 0.95, 0.99)],
               "s", "Whole-call latency of successful calls, streams included."),
            ts("Latency by model, P50 and P95", [(f"{N.latency(q)}{{{F}}}", f"{{{{model}}}} P{q}") for q in (50, 95)],
               "s", "Successful calls, from the recording rules the latency alerts use."),
            ts("Time to first token P50 / P95", [(_q(q, ttft, F), f"P{round(q * 100)}") for q in (0.5, 0.95)], "s",
               "Streamed calls: arrival to the first content chunk."),
            ts("Time to first token by model, P50 and P95", [(f"{N.ttft(q)}{{{F}}}", f"{{{{model}}}} P{q}")
                                                              for q in (50, 95)], "s",
               "From the recording rules the TTFT alert uses."),
            ts("Time per output token P50 / P95", [(_q(q, "tokenbooth_time_per_output_token_seconds", F),
                                                    f"P{round(q * 100)}") for q in (0.5, 0.95)], "s",
               "Streamed calls: time between output tokens.", span=24),
        ]),
        ("Tokens and cost", [
            ts("Tokens per minute by model and type", [(f"sum by (model, type) ({N.tokens_per_minute()}{{{F}}})",
                                                        "{{model}} {{type}}")], "short",
               "Input and output include their cached and reasoning parts."),
            ts("Cost per hour by model", [(f"sum by (model) ({N.cost_increase(HOUR)}{{{F}}})", "{{model}}")],
               "currencyUSD", "Priced calls over the last hour, in US dollars.", stacked=True),
        ]),
        ("Errors", [
            ts("Errors per second by type", [(f'sum by (error_type) (rate(tokenbooth_requests_total{{{F},'
                                              f'outcome="error"}}[{RI}]))', "{{error_type}}")], "reqps",
               "rate_limited 429, auth 401/403, bad_request, context_length, server_error 5xx, timeouts, "
               "connection, invalid_response.", stacked=True),
            ts("Failed share by model", [(f"{N.failed_ratio()}{{{F}}}", "{{model}}")], "percentunit",
               "Failures the caller did not cause, over 5 minutes (what the error-rate alerts use)."),
            ts("429, 5xx and timeout share by model", [(
                f'sum by (model, error_type) ({N.error_type_ratio()}{{{F},error_type=~"rate_limited|server_error|'
                f'timeout_connect|timeout_read"}})', "{{model}} {{error_type}}")], "percentunit",
               "Each error type's share of calls over 5 minutes."),
            ts("In-flight calls by model", [(f"sum by (model) (tokenbooth_in_flight_requests{{{F}}})", "{{model}}")],
               "short", "Calls started and not yet finished."),
        ]),
    ]
    return _dashboard("tokenbooth-overview", "tokenbooth overview", "Health and cost of LLM API calls.",
                      [_variable("provider", "tokenbooth_requests_total"),
                       _variable("model", "tokenbooth_requests_total")], rows)


def _budget_steps() -> ThresholdsConfig:
    """Green, orange from the default warning ratio (TokenboothBudgetNearlySpent), red at the limit."""
    warning = StackConfig().budget_warning_ratio
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(None, "green"), Threshold(warning, "orange"), Threshold(1, "red")])


def cost() -> dict[str, Any]:
    """Spend by model, provider and tenant; budgets and refusals; tokens; unpriced calls; the month's projection."""
    cost_total = f"tokenbooth_cost_usd_total{{{F}}}"
    tokens = f'tokenbooth_tokens_total{{{F},type=~"input|output"}}'
    used = "max by (tenant, window) (tokenbooth_budget_used_ratio)"  # replicas' views: the latest is the highest
    warning = f"{StackConfig().budget_warning_ratio:.0%}"
    rows: list[tuple[str, list[Panel]]] = [
        ("Spend", [
            single("Cost today", f"sum(increase({cost_total}[$__range]))", "currencyUSD", "Since midnight.", "now/d"),
            single("Cost this month", f"sum(increase({cost_total}[$__range]))", "currencyUSD", "Since the first.",
                   "now/M"),
            single("Projected 30 days", f"sum(rate({cost_total}[6h])) * 2592000", "currencyUSD",
                   "30 days at the rate of the last 6 hours (what the monthly budget alert uses)."),
            single("Unpriced calls today", f"sum(increase(tokenbooth_unpriced_requests_total{{{F}}}[$__range]))",
                   "short", "Calls with usage but no known price: their cost is missing above.", "now/d"),
            ts("Cost per hour by model", [(f"sum by (model) ({N.cost_increase(HOUR)}{{{F}}})", "{{model}}")],
               "currencyUSD", "Rolling hour, in US dollars.", stacked=True),
            ts("Cost per hour by provider", [(f"sum by (provider) ({N.cost_increase(HOUR)}{{{F}}})", "{{provider}}")],
               "currencyUSD", "Rolling hour, in US dollars.", stacked=True),
            bars("Cost by model, selected range", f"sort_desc(sum by (model) (increase({cost_total}[$__range])))",
                 "{{model}}", "currencyUSD", "Priced calls in the dashboard's time range."),
        ]),
        ("Tenants", [
            ts("Cost per hour by tenant", [(f"sum by (tenant) (rate({cost_total}[{RI}])) * 3600", "{{tenant}}")],
               "currencyUSD", "Needs tenant labels enabled on the gateway; without them this is one series.",
               stacked=True),
            bars("Tokens by tenant, selected range", f"sort_desc(sum by (tenant) (increase({tokens}[$__range])))",
                 "{{tenant}}", "short", "Input and output tokens; needs tenant labels enabled."),
        ]),
        ("Budgets", [
            bars("Budget used by tenant and window", f"sort_desc({used})", "{{tenant}} {{window}}", "percentunit",
                 "Spent / limit of each tenant budget in its current day, month or total window; orange from "
                 f"{warning} (TokenboothBudgetNearlySpent with the default threshold), red at the limit. Key "
                 "budgets: `tokenbooth budgets`.").min(0).max(1).thresholds(_budget_steps()),
            ts("Budget used over time", [(used, "{{tenant}} {{window}}")], "percentunit",
               "The same ratio over time; it drops when a window resets. Dashed lines: warning and limit.")
            .min(0).thresholds(_budget_steps())
            .thresholds_style(GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.DASHED)),
            ts("Budget spent and limit", [("max by (tenant, window) (tokenbooth_budget_spent_usd)",
                                           "{{tenant}} {{window}} spent"),
                                          ("max by (tenant, window) (tokenbooth_budget_limit_usd)",
                                           "{{tenant}} {{window}} limit")],
               "currencyUSD", "Spend in the current window against the limit, in US dollars."),
            ts("Calls refused per minute by reason", [(
                f"sum by (reason) (rate(tokenbooth_rejected_requests_total[{RI}])) * 60", "{{reason}}")], "short",
               "Calls the gateway refused itself: budget (a hard budget of the tenant or key), rate_limit, "
               "concurrency, auth, invalid_request, not_found.", stacked=True),
        ]),
        ("Tokens", [
            ts("Tokens per minute by type", [(f"sum by (type) ({N.tokens_per_minute()}{{{F}}})", "{{type}}")], "short",
               "cached_input, cache_write and reasoning are parts of input and output."),
            ts("Cached share of input tokens", [(
                f'sum by (model) (rate(tokenbooth_tokens_total{{{F},type="cached_input"}}[{RI}])) / '
                f'(sum by (model) (rate(tokenbooth_tokens_total{{{F},type="input"}}[{RI}])) > 0)', "{{model}}")],
               "percentunit", "Prompt caching: cached input is billed at a lower rate."),
            ts("Unpriced calls per minute by model", [(
                f"sum by (model) (rate(tokenbooth_unpriced_requests_total{{{F}}}[{RI}])) * 60", "{{model}}")],
               "short", "Add these models to a price file (tokenbooth prices MODEL shows what applies)."),
            ts("Token estimate mismatches per hour", [(
                f"sum by (model) (rate(tokenbooth_token_estimate_mismatch_total{{{F}}}[{RI}])) * 3600", "{{model}}")],
               "short", "Reported usage far from the local estimate: a relay inflating usage shows here."),
        ]),
        ("Response cache", [
            single("Saved by the cache today", f"sum(increase(tokenbooth_cache_saved_usd_total{{{F}}}[$__range]))",
                   "currencyUSD", "What the calls answered from the cache would have cost at today's prices.",
                   "now/d"),
            single("Saved this month", f"sum(increase(tokenbooth_cache_saved_usd_total{{{F}}}[$__range]))",
                   "currencyUSD", "Since the first.", "now/M"),
            ts("Cache hit rate by job", [(N.cache_hit_ratio(), "{{job}}")], "percentunit",
               "Share of the calls looked up in the cache that it answered, over the last hour "
               "(TokenboothCacheHitRateDrop fires when it halves against the previous day).").min(0).max(1),
            ts("Saved per hour by model", [(
                f"sum by (model) (rate(tokenbooth_cache_saved_usd_total{{{F}}}[{RI}])) * 3600", "{{model}}")],
               "currencyUSD", "Cost of the answers the cache gave instead of the upstream, in US dollars.",
               stacked=True),
            ts("Cache requests per minute by result", [(
                f"sum by (result) (rate(tokenbooth_cache_requests_total[{RI}])) * 60", "{{result}}")], "short",
               "hit, miss, store_skipped (no-store), bypass (not looked up: a sampled call, no-cache, or the cache "
               "off for its key or tenant).", stacked=True),
            ts("Tokens saved per minute by type", [(
                f"sum by (type) (rate(tokenbooth_cache_saved_tokens_total[{RI}])) * 60", "{{type}}")], "short",
               "Tokens the cache's answers did not use upstream."),
        ]),
    ]
    return _dashboard("tokenbooth-cost", "tokenbooth cost and tenants", "Where the money goes.",
                      [_variable("provider", "tokenbooth_cost_usd_total"),
                       _variable("model", "tokenbooth_cost_usd_total")], rows)


def agents() -> dict[str, Any]:
    """Agent sessions, steps and tool calls."""
    a = 'agent=~"$agent"'
    t = 'tool=~"$tool"'
    rows: list[tuple[str, list[Panel]]] = [
        ("Sessions", [
            single("Active sessions", f"sum(tokenbooth_agent_sessions_active{{{a}}})", "short", "In progress now."),
            single("Sessions finished per minute", f"sum(rate(tokenbooth_agent_session_duration_seconds_count{{{a}}}"
                   f"[{RI}])) * 60", "short", "All outcomes."),
            ts("Active sessions by agent", [(f"sum by (agent) (tokenbooth_agent_sessions_active{{{a}}})", "{{agent}}")],
               "short", "Sessions in progress.", stacked=True),
            ts("Sessions finished per minute by outcome", [(
                f"sum by (agent, outcome) (rate(tokenbooth_agent_session_duration_seconds_count{{{a}}}[{RI}])) * 60",
                "{{agent}} {{outcome}}")], "short", "Finished sessions by how they ended."),
            ts("Session duration P50 / P95", [(_q(q, "tokenbooth_agent_session_duration_seconds", a, ", agent"),
                                              f"{{{{agent}}}} P{round(q * 100)}") for q in (0.5, 0.95)], "s",
               "Finished sessions."),
            ts("Steps per session P50 / P95", [(_q(q, "tokenbooth_agent_session_steps", a, ", agent"),
                                               f"{{{{agent}}}} P{round(q * 100)}") for q in (0.5, 0.95)], "short",
               "Steps taken by finished sessions."),
            ts("Step duration P95 by step type", [(_q(0.95, "tokenbooth_agent_step_duration_seconds", a, ", step_type"),
                                                   "{{step_type}}")], "s", "LLM calls, tool calls and other steps."),
        ]),
        ("Tools", [
            ts("Tool calls per minute by status", [(
                f"sum by (tool, status) (rate(tokenbooth_tool_calls_total{{{t}}}[{RI}])) * 60", "{{tool}} {{status}}")],
               "short", "success, error, timeout.", stacked=True),
            ts("Tool failure share", [(f"{N.tool_failed_ratio()}{{{t}}}", "{{tool}}")], "percentunit",
               "Errors and timeouts over 5 minutes (what the tool alert uses)."),
            ts("Tool duration P95", [(_q(0.95, "tokenbooth_tool_duration_seconds", t, ", tool"), "{{tool}}")], "s",
               "By tool."),
        ]),
    ]
    return _dashboard("tokenbooth-agents", "tokenbooth agents", "Agent sessions, steps and tool calls.",
                      [_variable("agent", "tokenbooth_agent_sessions_active"),
                       _variable("tool", "tokenbooth_tool_calls_total")], rows)


def internals() -> dict[str, Any]:
    """Retries, fallbacks, circuits, the ledger queue, scrape targets, the Pushgateway."""
    circuit = (statetimeline.Panel().title("Circuit state by upstream").datasource(DS).span(24).height(6)
               .description("closed: calls go through; open: they fail fast or fall back; half-open: one probe.")
               .mappings([ValueMap({"0": ValueMappingResult(text="closed", color="green", index=0),
                                    "1": ValueMappingResult(text="half-open", color="orange", index=1),
                                    "2": ValueMappingResult(text="open", color="red", index=2)})])
               .with_target(_target("max by (upstream) (tokenbooth_circuit_state)", "{{upstream}}", "A")))
    redis = (statetimeline.Panel().title("Redis by instance").datasource(DS).span(24).height(6)
              .description("shared: budgets and limits are kept in Redis; in process: Redis is unreachable, limits "
                           "hold per replica and each hard budget lends it redis.outage_credit of its limit. No row: "
                           "no Redis configured.")
              .mappings([ValueMap({"1": ValueMappingResult(text="shared", color="green", index=0),
                                   "0": ValueMappingResult(text="in process", color="red", index=1)})])
              .with_target(_target("min by (instance) (tokenbooth_redis_up)\nand on (instance) count by (instance) "
                                   "(tokenbooth_redis_duration_seconds_count)", "{{instance}}", "A")))
    rows: list[tuple[str, list[Panel]]] = [
        ("Resilience", [
            ts("Retries per minute", [(
                f"sum by (upstream, reason) (rate(tokenbooth_upstream_retries_total[{RI}])) * 60",
                "{{upstream}} {{reason}}")], "short", "Retries sent to upstreams, by reason.",
               stacked=True),
            ts("Fallbacks per minute", [(
                f"sum by (from_upstream, to_upstream, reason) (rate(tokenbooth_fallbacks_total[{RI}])) * 60",
                "{{from_upstream}} → {{to_upstream}} ({{reason}})")], "short", "Calls moved along a fallback chain.",
               stacked=True),
            circuit,
        ]),
        ("Ledger and load", [
            ts("Ledger queue depth", [("sum by (instance) (tokenbooth_ledger_queue_depth)", "{{instance}}")], "short",
               "Rows waiting for the batched writer; a growing queue means the database is too slow."),
            ts("Ledger rows per second", [(f"sum by (result) (rate(tokenbooth_ledger_rows_total[{RI}]))",
                                           "{{result}}")],
               "short", "written, or failed (retried, or spilled to a file at shutdown)."),
            ts("In-flight calls by instance", [("sum by (instance) (tokenbooth_in_flight_requests)", "{{instance}}")],
               "short", "Calls started and not yet finished, per gateway."),
        ]),
        ("Redis", [
            redis,
            ts("Redis errors per minute by operation", [(
                f"sum by (operation) (rate(tokenbooth_redis_errors_total[{RI}])) * 60", "{{operation}}")], "short",
               "Commands that failed or timed out (redis.timeout); each sends the replica to in-process limits.",
               stacked=True),
            ts("Redis latency P99 by operation", [(
                "histogram_quantile(0.99, sum by (le, operation) "
                f"(rate(tokenbooth_redis_duration_seconds_bucket[{RI}])))", "{{operation}}")], "s",
               "Round trip of admit, settle and seed scripts and pings, per operation."),
            ts("Response cache errors per minute by operation", [(
                f"sum by (operation) (rate(tokenbooth_cache_errors_total[{RI}])) * 60", "{{operation}}")], "short",
               "Cache lookups (get) and stores (put) that failed or timed out (cache.timeout); a failed get is a "
               "miss, never an error to the client.", stacked=True),
            ts("Response cache lookup latency P99", [(
                "histogram_quantile(0.99, sum by (le, backend) "
                f"(rate(tokenbooth_cache_lookup_duration_seconds_bucket[{RI}])))", "{{backend}}")], "s",
               "Round trip of a lookup in the cache's Redis."),
        ]),
        ("Targets", [
            ts("Scrape targets up", [('up{job=~"tokenbooth.*"}', "{{job}} {{instance}}")], "short",
               "1 up, 0 down (TokenboothInstanceDown fires after 2 minutes at 0)."),
            ts("Time since each batch job pushed", [("time() - push_time_seconds", "{{job}}")], "s",
               "Pushgateway groups (TokenboothPushgatewayStale fires past its threshold)."),
            ts("SDK pushes that failed per hour", [(
                f"sum by (job) (rate(tokenbooth_pushgateway_failures_total[{RI}])) * 3600", "{{job}}")], "short",
               "Pushes from batch jobs that did not reach the Pushgateway."),
        ]),
    ]
    return _dashboard("tokenbooth-internals", "tokenbooth gateway internals",
                      "Retries, fallbacks, circuit breakers, the ledger queue, Redis and the monitoring itself.", [],
                      rows)


def build_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard as Grafana JSON, by file name."""
    return {"overview.json": overview(), "cost.json": cost(), "agents.json": agents(), "internals.json": internals()}


def dashboard_json(data: dict[str, Any]) -> str:
    """The text of a dashboard file (stable: sorted keys, two-space indent)."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_dashboards(directory: Path = SHIPPED) -> list[Path]:
    """Regenerate the shipped JSON files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in build_dashboards().items():
        path = directory / name
        path.write_text(dashboard_json(data), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for written in write_dashboards():
        print(written)
