"""What to do when each alert fires: written into the generated stack README, one section per alert."""

from __future__ import annotations

__all__ = ["RUNBOOKS"]

_LEDGER = ("`tokenbooth report --by model --since $(date -u +%F)` and the ledger's `error_type` and "
           "`fallback_path` columns show which calls and which upstream")

RUNBOOKS: dict[str, str] = {
    "TokenboothHighErrorRate": f"""\
A model's calls are failing for reasons the caller did not cause.
- Open the *Overview* dashboard, *Errors by type*: the type says where to look (429 → quota, 5xx → provider
  incident, timeout → network or overload, auth → a revoked or rotated key).
- {_LEDGER}.
- Provider status pages; if one provider is down, route the model to a fallback (`routes:` in the config).""",
    "TokenboothHighLatencyP95": """\
Successful calls are slow. Long generations are slow by nature: compare with output tokens per call.
- *Overview* → latency and TTFT panels: if TTFT is also up, the provider is queueing; if only total latency,
  responses got longer (check tokens per minute by type).
- A slow upstream raises in-flight calls too; check *Gateway internals* for retries and fallbacks adding time.""",
    "TokenboothHighLatencyP99": """\
The slowest 1 % of calls are very slow: usually retries with backoff, long `Retry-After` waits, or fallbacks.
- *Gateway internals*: retries by reason and fallbacks; the ledger's `attempts` column shows the calls.
- Consider lowering `retry.attempts` or `retry_after_cap`, or a faster fallback target.""",
    "TokenboothSlowTimeToFirstToken": """\
Streamed calls wait long for their first token: the provider is queueing requests or prompts got longer.
- Compare input tokens per minute (cost dashboard); long prompts raise TTFT.
- Check the provider's status page; move latency-sensitive traffic to another upstream.""",
    "TokenboothRateLimited": """\
The upstream answers 429: the account's RPM/TPM quota is exhausted.
- *Cost and tenants* → tokens per minute: who is using the quota.
- Raise the quota with the provider, spread traffic over keys or upstreams (`routes:`), or slow down batch jobs.
- The gateway retries 429 honouring `Retry-After`; persistent 429s mean retries are not enough.""",
    "TokenboothUpstreamServerErrors": """\
The upstream answers 5xx: a provider incident or an overloaded self-hosted server.
- Provider status page; for a self-hosted server, its logs and GPU memory.
- A fallback chain (`routes:`) keeps callers served while the upstream recovers.""",
    "TokenboothUpstreamTimeouts": """\
Calls time out: `timeout_connect` points at the network or DNS, `timeout_read` at an upstream that stops
sending (overload, very long generations).
- *Overview* → errors by type splits the two.
- Check `upstreams[].timeout` in the config: a read timeout shorter than the longest legitimate generation
  cuts good calls.""",
    "TokenboothModelDown": """\
Every call to one model fails: a retired or renamed model, a key without access to it, or an outage.
- `tokenbooth report --by model` and the ledger's `http_status`: 404 means the model name is wrong or retired,
  401/403 the key, 5xx the provider.
- Route the model to another target (`routes:`) until it is fixed.""",
    "TokenboothTokenSpike": """\
A model uses several times its usual tokens: a runaway agent loop, a batch job, a prompt that grew, or abuse.
- *Cost and tenants* → tokens by tenant and model; the ledger (`tokenbooth report --by key`) shows which key.
- If it is unexpected, throttle or revoke the key; a spike is also a cost incident (check the cost alerts).""",
    "TokenboothInFlightBacklog": """\
Many calls are waiting on one model at once: the upstream slowed down, or clients send more than it serves.
- Latency and TTFT panels: a slow upstream shows there first.
- Check client-side concurrency and timeouts; a fallback or a second upstream adds capacity.""",
    "TokenboothToolErrorRate": """\
An agent tool fails or times out often: its backend is down, its credentials expired, or the agent calls it
with bad arguments.
- *Agents* dashboard → tool calls by status and duration.
- The tool's own logs; a timeout-heavy tool may need a longer timeout or a retry.""",
    "TokenboothCostPerHourHigh": """\
Spending in the last hour is above the hourly budget.
- *Cost and tenants*: cost by model and tenant for the last hour; `tokenbooth report --by key --since today`.
- A token spike or a new batch job is the usual cause; unpriced calls are not counted, so the real figure may
  be higher (see `tokenbooth_unpriced_requests_total`).""",
    "TokenboothCostPerDayOverBudget": """\
Spending in the last 24 hours is above the daily budget.
- `tokenbooth report --by day` and `--by model` for the days in question; *Cost and tenants* for the trend.
- Decide with the owners of the top keys or tenants whether to raise the budget or cut usage.""",
    "TokenboothMonthlyBudgetBurn": """\
At the rate of the last 6 hours the month would end over budget.
- `tokenbooth report --by month` shows the month to date; the alert's value is the projection (the last 6
  hours' rate over 30 days).
- A temporary burst resolves itself as the 6-hour rate falls; a new steady rate needs a budget decision.""",
    "TokenboothBudgetNearlySpent": """\
A tenant has spent most of one of its budgets (day, month or total) in the current window.
- `tokenbooth budgets` shows each budget's limit, spent, reserved, remaining and when it resets; *Cost and
  tenants* → *Budgets* shows which tenants are close.
- `tokenbooth report --by tenant` and `tokenbooth report --by key --since $(date -u +%F)` show which tenant and
  which of its keys spend (`tokenbooth keys list` maps key ids to names).
- Decide with the tenant's owner: raise the limit in `tenants.NAME.budgets`, or let a hard budget refuse calls
  at the limit. Key budgets have no gauge (keys never become labels): only refusals show them.""",
    "TokenboothBudgetExhausted": """\
A budget is spent: with `reason="budget"`, the gateway is refusing calls (HTTP 429, `insufficient_quota`)
because a hard budget of their tenant or key would be exceeded; with `tenant` and `window`, a tenant's budget
gauge reached its limit (a soft budget keeps serving and billing).
- `tokenbooth budgets` names the budget at its limit, what calls in flight have reserved, and when it resets.
- `tokenbooth report --by tenant` and `--by key` show who spent it; `tokenbooth keys list` shows each key's own
  budgets and limits.
- If the spend is legitimate, raise the limit (tenant budgets in the config; a key's budgets are set when it
  is created with `tokenbooth keys create --budget`); if not, revoke the key (`tokenbooth keys revoke ID`).""",
    "TokenboothBudgetBurnRate": """\
At the spend rate of the last 6 hours, a tenant's budget would pass its limit soon: within 6 hours for a day
budget, within 3 days for a month or total budget. The horizon is fixed, not the time left in the window
(PromQL cannot follow `budgets.timezone`), so near the end of a day or month this can fire for a budget that
resets first; the 6-hour trend also exaggerates a burst.
- `tokenbooth budgets` for spent, remaining and the reset time; `tokenbooth report --by key --since
  $(date -u +%F)` for which key spends (`tokenbooth keys list` names it).
- A runaway agent or batch job: throttle its key (`--rpm`, `--tpm`) or revoke it. Expected growth: raise the
  budget before a hard one starts refusing calls.""",
    "TokenboothInstanceDown": """\
Prometheus cannot scrape a target: the gateway (or Pushgateway) is down, restarting, or unreachable.
- `curl http://TARGET/metrics`; the process manager's or container's logs.
- While it is down, no other tokenbooth alert for it can fire.""",
    "TokenboothPushgatewayStale": """\
A batch job has not pushed its metrics for longer than expected.
- The job's scheduler (cron, Airflow, Kubernetes CronJob): did it run, did it fail before its last push?
- A job that was retired leaves its group behind: delete it in the Pushgateway UI or with
  `curl -X DELETE http://pushgateway:9091/metrics/job/JOB`.""",
    "TokenboothLedgerBehind": """\
The gateway queues ledger rows faster than it writes them; the queue is held in memory.
- *Gateway internals* → ledger queue depth and rows per second; the gateway's log shows failing writes.
- A database that is slow or down: check it (`tokenbooth doctor --config FILE`). A gateway at its limit: add workers
  (`--workers N`) or replicas; each process has its own writer.""",
    "TokenboothLedgerRowsFailed": """\
Call rows were not written to the ledger database after retries: at shutdown they go to the spill file
(`tokenbooth-ledger-spill.jsonl` unless configured), one JSON row per line.
- The gateway's log says why the database refused them, and where the rows went.
- Fix the database, then `tokenbooth ledger replay tokenbooth-ledger-spill.jsonl`; rows already in the
  ledger are skipped. The metrics kept counting, so the ledger is the only thing behind.""",
    "TokenboothCircuitOpen": """\
The gateway stopped calling an upstream after repeated failures; calls fail fast or fall back.
- *Gateway internals* → circuit state and fallbacks; the upstream's errors show in *Errors by type*.
- It closes by itself when a probe after the cooldown succeeds; if the upstream is gone for good, remove it
  from the routes.""",
    "TokenboothRedisUnreachable": """\
A gateway replica cannot reach Redis, where budgets and rate limits are shared. It keeps serving: each replica
enforces rate and concurrency limits on its own (so N replicas allow up to N times a limit), and each hard budget
lends each replica at most `redis.outage_credit` (default 1 %) of its limit, never more than was left when
Redis last answered. Settlements made meanwhile are replayed when Redis answers again.
- The gateway's log says why (`Redis is unreachable (...)`); check Redis itself (`redis-cli -u URL ping`),
  the network between them, and `redis.url` and `redis.timeout` in the config.
- *Gateway internals* → *Redis*: errors by operation and P99 latency; a slow Redis (over `redis.timeout`,
  0.25 s by default) counts as unreachable.
- A long outage lets spend run past hard budgets by up to `outage_credit` × replicas: check `tokenbooth budgets`
  afterwards.""",
    "TokenboothCacheHitRateDrop": """\
The response cache answers far fewer of the calls looked up in it than it did over the last day: each miss is
paid for upstream.
- *Cost and tenants* → Response cache: hit rate and saved cost by job, requests by result.
- A deploy that changed the requests (a timestamp, a request id or a random example in the prompt) makes every
  key new: compare two ledger rows' requests. `bypass` rising means clients stopped pinning temperature or seed.
- *Gateway internals* → cache errors: with Redis unreachable every call is a miss (TokenboothRedisUnreachable).""",
    "TokenboothAvailabilityBurnRate": """\
Failures are spending the availability objective's error budget faster than it lasts. Critical: at this rate
the month's budget is gone within days (page). Warning: it runs out before the month ends (ticket).
- Same checks as *TokenboothHighErrorRate*; the burn rate says how urgent it is.""",
    "TokenboothLatencyBurnRate": """\
Too many successful calls are slower than the latency objective, fast enough to spend its budget early.
- Same checks as *TokenboothHighLatencyP95*; compare with output tokens per call before blaming the provider.""",
}
