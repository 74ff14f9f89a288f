"""Every metric tokenbooth exports, declared once.

Metric names and labels are a public interface (PRODUCT.md): dashboards, alert rules and
``docs/metrics.md`` are all checked against this module. ``python -m tokenbooth.catalog``
prints the generated documentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CATALOG", "DURATION_BUCKETS", "MetricSpec", "Metrics", "render_markdown", "total"]

Kind = Literal["counter", "gauge", "histogram"]

# LLM calls take from tens of milliseconds to several minutes; client_python's default
# buckets stop at 10 s, which would put every long generation into +Inf.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
SESSION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STEP_COUNT_BUCKETS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
CACHE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
TOOL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its full name (with ``_total`` for counters), type, help, labels, buckets."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    # How a gauge's per-process values combine in client_python's multiprocess mode.
    multiprocess_mode: str = "livesum"


def _spec(
    name: str, kind: Kind, help: str, labels: str = "", buckets: tuple[float, ...] | None = None,
    multiprocess_mode: str = "livesum",
) -> MetricSpec:
    return MetricSpec(name, kind, help, tuple(labels.split()) if labels else (), buckets, multiprocess_mode)


CATALOG: tuple[MetricSpec, ...] = (
    _spec("tokenbooth_requests_total", "counter", "LLM API calls by outcome and error type.",
          "provider model operation outcome error_type"),
    _spec("tokenbooth_request_duration_seconds", "histogram",
          "Whole-call latency, from arrival to the last byte (streams included).",
          "provider model operation outcome", DURATION_BUCKETS),
    _spec("tokenbooth_time_to_first_token_seconds", "histogram",
          "Time from the request's arrival to the first content chunk of a streamed call.",
          "provider model operation", TTFT_BUCKETS),
    _spec("tokenbooth_time_per_output_token_seconds", "histogram",
          "Time between output tokens of a streamed call, first to last chunk.",
          "provider model", PER_TOKEN_BUCKETS),
    _spec("tokenbooth_tokens_total", "counter",
          "Tokens by type; input and output are totals that include their cached and reasoning parts.",
          "provider model operation type"),
    _spec("tokenbooth_cost_usd_total", "counter", "Cost of priced calls in US dollars.", "provider model"),
    _spec("tokenbooth_unpriced_requests_total", "counter",
          "Calls with usage but no known price (their cost is not counted as zero).", "provider model"),
    _spec("tokenbooth_in_flight_requests", "gauge", "Calls started and not yet finished.", "provider model"),
    _spec("tokenbooth_upstream_retries_total", "counter", "Retries sent to an upstream, by reason.",
          "upstream reason"),
    _spec("tokenbooth_fallbacks_total", "counter", "Calls moved from one upstream to the next in a chain.",
          "from_upstream to_upstream reason"),
    _spec("tokenbooth_circuit_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
          "upstream", multiprocess_mode="livemax"),
    _spec("tokenbooth_token_estimate_mismatch_total", "counter",
          "Calls whose local token estimate differed from the reported usage beyond the threshold.",
          "provider model"),
    _spec("tokenbooth_usage_rejected_total", "counter",
          "Calls whose reported usage was out of any sane range (over 1e9 tokens of a kind): recorded with "
          "a local estimate instead, flagged as estimated.", "provider"),
    _spec("tokenbooth_cache_requests_total", "counter",
          "Cacheable calls by the response cache's result: hit (answered from the cache), miss (looked up, "
          "not found, or the cache failed), bypass (not looked up), store_skipped (not found, and not to be "
          "stored).", "result"),
    _spec("tokenbooth_cache_saved_usd_total", "counter",
          "What cache hits would have cost at the price of the moment, in US dollars (hits themselves cost 0).",
          "provider model"),
    _spec("tokenbooth_cache_saved_tokens_total", "counter",
          "Tokens cache hits did not use, by type (as tokenbooth_tokens_total counts them).", "type"),
    _spec("tokenbooth_cache_lookup_duration_seconds", "histogram",
          "Time of one response-cache lookup in Redis, its round trip included (memory lookups are not "
          "timed: one dict read).", "backend", CACHE_BUCKETS),
    _spec("tokenbooth_cache_errors_total", "counter",
          "Response-cache backend commands that failed or timed out, by operation (get, put); a failed "
          "get makes the call a miss.", "operation"),
    _spec("tokenbooth_cache_entries", "gauge", "Answers held by this process's memory cache (updated at most once "
          "a second)."),
    _spec("tokenbooth_cache_bytes", "gauge", "Bytes held by this process's memory cache (cache.max_bytes bounds it; "
          "updated at most once a second)."),
    _spec("tokenbooth_ledger_rows_total", "counter",
          "Ledger rows by result: written, or failed (kept for retry or spilled to a file).", "result"),
    _spec("tokenbooth_ledger_queue_depth", "gauge", "Ledger rows waiting to be written."),
    _spec("tokenbooth_agent_sessions_active", "gauge", "Agent sessions in progress.", "agent"),
    _spec("tokenbooth_agent_session_duration_seconds", "histogram", "Duration of finished agent sessions.",
          "agent outcome", SESSION_BUCKETS),
    _spec("tokenbooth_agent_session_steps", "histogram", "Steps taken by finished agent sessions.",
          "agent", STEP_COUNT_BUCKETS),
    _spec("tokenbooth_agent_step_duration_seconds", "histogram", "Duration of agent steps by type.",
          "agent step_type", DURATION_BUCKETS),
    _spec("tokenbooth_tool_calls_total", "counter", "Tool calls by tool and status (success, error, timeout).",
          "tool status"),
    _spec("tokenbooth_tool_duration_seconds", "histogram", "Duration of tool calls.", "tool", TOOL_BUCKETS),
    _spec("tokenbooth_pushgateway_failures_total", "counter",
          "Pushes to the Pushgateway that failed (logged, retried with backoff, never raised)."),
    _spec("tokenbooth_rejected_requests_total", "counter",
          "Calls the gateway refused itself, never sent upstream: auth, budget, rate_limit, concurrency, "
          "invalid_request, not_found, too_large, headers_too_large, timeout, connection_limit.", "reason"),
    _spec("tokenbooth_budget_used_ratio", "gauge",
          "Share of a tenant's budget spent in its current window (1 = all of it).", "tenant window",
          multiprocess_mode="livemax"),
    _spec("tokenbooth_budget_spent_usd", "gauge", "A tenant's spend in the budget's current window, in US dollars.",
          "tenant window", multiprocess_mode="livemax"),
    _spec("tokenbooth_budget_limit_usd", "gauge", "A tenant's budget limit for its window, in US dollars.",
          "tenant window", multiprocess_mode="livemax"),
    _spec("tokenbooth_redis_up", "gauge",
          "1 while Redis answers; 0 while budgets and limits are enforced in process instead (and on a "
          "gateway with no redis.url).",
          multiprocess_mode="livemin"),
    _spec("tokenbooth_redis_errors_total", "counter", "Redis commands that failed or timed out, by operation.",
          "operation"),
    _spec("tokenbooth_redis_duration_seconds", "histogram", "Time of Redis commands (admit, settle, seed), "
          "round trip included.", "operation", REDIS_BUCKETS),
    _spec("tokenbooth_admission_overshoot_total", "counter",
          "Calls admitted without waiting for Redis (redis.fast_admission) that Redis then found past a "
          "limit: other replicas had used the room this one saw. Each is at most one call past the limit."),
)

# Metrics that gain a `tenant` label with metrics.tenant_labels: true.
TENANT_LABELLED = frozenset({"tokenbooth_requests_total", "tokenbooth_tokens_total", "tokenbooth_cost_usd_total"})

_BY_NAME = {spec.name: spec for spec in CATALOG}


class Metrics:
    """The catalog's metrics, registered on one registry.

    Attributes are named after the metric without the ``tokenbooth_`` prefix and the
    ``_total`` suffix, e.g. ``metrics.requests`` for ``tokenbooth_requests_total``.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, tenant_labels: bool = False) -> None:
        self.registry = registry
        self.tenant_labels = tenant_labels
        made: dict[str, Counter | Gauge | Histogram] = {}
        for spec in CATALOG:
            if tenant_labels and spec.name in TENANT_LABELLED:
                spec = MetricSpec(spec.name, spec.kind, spec.help, (*spec.labels, "tenant"), spec.buckets)
            base = spec.name.removeprefix("tokenbooth_")
            if spec.kind == "counter":
                # client_python appends _total itself.
                base = base.removesuffix("_total")
                made[base] = Counter(spec.name.removesuffix("_total"), spec.help, spec.labels,
                                     registry=registry)
            elif spec.kind == "gauge":
                made[base] = Gauge(spec.name, spec.help, spec.labels, registry=registry,
                                   multiprocess_mode=spec.multiprocess_mode)  # type: ignore[arg-type]
            else:
                made[base] = Histogram(spec.name, spec.help, spec.labels, registry=registry,
                                       buckets=spec.buckets or DURATION_BUCKETS)
        self.requests: Counter = made["requests"]  # type: ignore[assignment]
        self.request_duration: Histogram = made["request_duration_seconds"]  # type: ignore[assignment]
        self.ttft: Histogram = made["time_to_first_token_seconds"]  # type: ignore[assignment]
        self.time_per_output_token: Histogram = made["time_per_output_token_seconds"]  # type: ignore[assignment]
        self.tokens: Counter = made["tokens"]  # type: ignore[assignment]
        self.cost_usd: Counter = made["cost_usd"]  # type: ignore[assignment]
        self.unpriced: Counter = made["unpriced_requests"]  # type: ignore[assignment]
        self.in_flight: Gauge = made["in_flight_requests"]  # type: ignore[assignment]
        self.retries: Counter = made["upstream_retries"]  # type: ignore[assignment]
        self.fallbacks: Counter = made["fallbacks"]  # type: ignore[assignment]
        self.circuit_state: Gauge = made["circuit_state"]  # type: ignore[assignment]
        self.estimate_mismatch: Counter = made["token_estimate_mismatch"]  # type: ignore[assignment]
        self.usage_rejected: Counter = made["usage_rejected"]  # type: ignore[assignment]
        self.ledger_rows: Counter = made["ledger_rows"]  # type: ignore[assignment]
        self.ledger_queue_depth: Gauge = made["ledger_queue_depth"]  # type: ignore[assignment]
        self.agent_sessions_active: Gauge = made["agent_sessions_active"]  # type: ignore[assignment]
        self.agent_session_duration: Histogram = made["agent_session_duration_seconds"]  # type: ignore[assignment]
        self.agent_session_steps: Histogram = made["agent_session_steps"]  # type: ignore[assignment]
        self.agent_step_duration: Histogram = made["agent_step_duration_seconds"]  # type: ignore[assignment]
        self.tool_calls: Counter = made["tool_calls"]  # type: ignore[assignment]
        self.tool_duration: Histogram = made["tool_duration_seconds"]  # type: ignore[assignment]
        self.push_failures: Counter = made["pushgateway_failures"]  # type: ignore[assignment]
        self.rejected: Counter = made["rejected_requests"]  # type: ignore[assignment]
        self.budget_used_ratio: Gauge = made["budget_used_ratio"]  # type: ignore[assignment]
        self.budget_spent_usd: Gauge = made["budget_spent_usd"]  # type: ignore[assignment]
        self.budget_limit_usd: Gauge = made["budget_limit_usd"]  # type: ignore[assignment]
        self.redis_up: Gauge = made["redis_up"]  # type: ignore[assignment]
        self.redis_errors: Counter = made["redis_errors"]  # type: ignore[assignment]
        self.redis_duration: Histogram = made["redis_duration_seconds"]  # type: ignore[assignment]
        self.fast_overshoot: Counter = made["admission_overshoot"]  # type: ignore[assignment]
        self.cache_requests: Counter = made["cache_requests"]  # type: ignore[assignment]
        self.cache_saved_usd: Counter = made["cache_saved_usd"]  # type: ignore[assignment]
        self.cache_saved_tokens: Counter = made["cache_saved_tokens"]  # type: ignore[assignment]
        self.cache_lookup_duration: Histogram = made["cache_lookup_duration_seconds"]  # type: ignore[assignment]
        self.cache_errors: Counter = made["cache_errors"]  # type: ignore[assignment]
        self.cache_entries: Gauge = made["cache_entries"]  # type: ignore[assignment]
        self.cache_bytes: Gauge = made["cache_bytes"]  # type: ignore[assignment]
        self.calls_recorded = 0  # how many calls the meters have recorded here (for push batching)


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of a sample's values over the series matching ``labels`` (all series when none).

    >>> total(registry, "tokenbooth_requests_total", outcome="error")   # doctest: +SKIP
    """
    value = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                value += s.value
    return value


def spec(name: str) -> MetricSpec:
    """The spec of one metric by its exported name."""
    return _BY_NAME[name]


def render_markdown() -> str:
    """The metric reference, generated from the catalog (``docs/metrics.md``)."""
    lines = [
        "# Metrics",
        "",
        "Generated from `tokenbooth/catalog.py` by `python -m tokenbooth.catalog`; do not edit by hand.",
        "Names and labels are a public interface: changing one is a breaking change.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for s in CATALOG:
        labels = ", ".join(s.labels) if s.labels else "—"
        lines.append(f"| `{s.name}` | {s.kind} | {labels} | {s.help} |")
    lines += ["", "## Histogram buckets (seconds, or steps)", ""]
    for s in CATALOG:
        if s.buckets:
            lines.append(f"- `{s.name}`: {', '.join(f'{b:g}' for b in s.buckets)}")
    lines += [
        "",
        "## Label values",
        "",
        "- `outcome`: success, error, cancelled.",
        "- `error_type`: \"\" on success; rate_limited, auth, bad_request, context_length, server_error,",
        "  timeout_connect, timeout_read, connection, cancelled, invalid_response.",
        "- `operation`: chat, text_completion, embeddings, count_tokens (Anthropic token counting, never billed);",
        "  for the other `/v1/` paths passed through, their family: responses (stored responses), moderations,",
        "  audio, images, files, batches, fine_tuning, vector_stores, assistants, other.",
        "- `model`: \"\" on a passed-through call whose request names no model (a file upload, a GET).",
        "- `reason` (rejected requests): auth, budget, rate_limit, concurrency, invalid_request, not_found,",
        "  too_large (a body past `limits.max_request_bytes` or `limits.max_upload_bytes`), headers_too_large",
        "  (431: a head past `limits.max_header_bytes` or `limits.max_headers`), timeout (408: a head not whole",
        "  within `limits.header_timeout`, a body silent for `limits.body_timeout`), connection_limit (past",
        "  `limits.max_connections`: a connection closed as it was accepted, or a 503 on one kept for the probes).",
        "- `window` (budgets): day, month, total.",
        "- `tenant`: on budgets, the tenants configured with budgets. With `metrics.tenant_labels: true`,",
        "  requests, tokens and cost carry it too: the first `metrics.max_tenants` tenants seen keep their",
        "  name (configured ones first), the rest are `other`, and calls without a tenant have `\"\"`.",
        "- `type` (tokens, and tokens saved by the cache): input, output, cached_input, cache_write, reasoning.",
        "- `result` (cache requests): hit, miss, bypass, store_skipped. `backend` (cache lookups): memory, redis.",
        "  `operation` (cache errors): get, put.",
        "- `model`: the model the caller asked for when it is configured or known to the price data;",
        "  anything else is folded to `other`, so a typo never creates a series.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(render_markdown(), end="")
