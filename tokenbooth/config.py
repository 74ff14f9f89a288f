"""Settings, built once at start-up and validated.

Precedence, lowest to highest: built-in defaults, the YAML file (``--config`` or
``TOKENBOOTH_CONFIG``), ``TOKENBOOTH_*`` environment variables, command-line flags.

Environment variables name a key path with ``__`` between levels, e.g.
``TOKENBOOTH_LEDGER__URL=postgresql+psycopg://...`` or ``TOKENBOOTH_PORT=9000``;
``TOKENBOOTH_UPSTREAM`` is the one-line form of ``--upstream``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.request
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tokenbooth.errors import ConfigError

__all__ = ["AuthConfig", "BudgetConfig", "BudgetsConfig", "CacheConfig", "CircuitConfig", "LedgerConfig",
           "LimitsConfig", "NotifyConfig", "PassthroughConfig", "PricingConfig", "RedisConfig", "RequestLimitsConfig",
           "RetryConfig", "RobotConfig", "RouteTarget", "Settings", "StackConfig", "TenantConfig", "TokensConfig",
           "UpstreamConfig", "load_settings"]

ENV_PREFIX = "TOKENBOOTH_"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutConfig(_Model):
    """Per-upstream timeouts in seconds. LLM calls are long, connections should be quick."""

    connect: float = Field(10.0, gt=0)
    read: float = Field(300.0, gt=0)  # the longest silence between bytes
    total: float = Field(600.0, gt=0)
    # how long an idle connection is kept for reuse: under common servers' own keep-alive
    # timeouts (60 s and up), so the gateway closes it first
    keepalive: float = Field(50.0, gt=0)


class RetryConfig(_Model):
    """Retries of one upstream: 429, 500, 502, 503, 504, connection errors and connect timeouts."""

    attempts: int = Field(3, ge=1, le=10)  # tries per upstream, the first included (2 retries)
    backoff_base: float = Field(0.5, ge=0)  # seconds; full jitter over base * 2**(retry-1)
    backoff_max: float = Field(8.0, ge=0)
    retry_after_cap: float = Field(30.0, ge=0)  # a longer Retry-After means give up or fall back
    on_read_timeout: bool = False  # the call may already be billed, so not by default


class CircuitConfig(_Model):
    """The circuit breaker of one upstream."""

    enabled: bool = True
    # Failures of calls that interleave: 5 in a row happens by chance at an 8 % fault rate
    # within a day at 40 calls/s (seen in the 30-minute soak); 10 does not.
    consecutive_failures: int = Field(10, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    min_calls: int = Field(20, ge=1)  # calls in the window before the ratio counts
    window: float = Field(60.0, gt=0)  # seconds
    cooldown: float = Field(30.0, gt=0)  # seconds open before a probe is let through


class RouteTarget(_Model):
    """One step of a fallback chain: an upstream, and the model to ask it for."""

    upstream: str
    model: str | None = None  # None: the model the client asked for


_QUERY_VALUE = re.compile(r"([?&][^=&#]*=)[^&#]*")
_CREDENTIALS = re.compile(r"(?<=://)([^/@\s]*?):[^@\s]*@")


def _masked(value: Any) -> Any:
    """A config value fit for an error message: a URL's password and its query's values (a chat
    robot's access token) show as ``***``.

    >>> _masked("http://user:s3cret@proxy:3128"), _masked(8080)
    ('http://user:***@proxy:3128', 8080)
    >>> _masked("ftp://oapi.dingtalk.com/robot/send?access_token=abc123&x=1")
    'ftp://oapi.dingtalk.com/robot/send?access_token=***&x=***'
    """
    if not isinstance(value, str):
        return value
    return _QUERY_VALUE.sub(r"\1***", _CREDENTIALS.sub(r"\1:***@", value))


_PROXY_FORM = ("an http:// proxy URL such as http://user:password@proxy.internal:3128 (with '/', '?', '#' and "
               "'@' in the credentials %-quoted)")


def _usable_proxy(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "http" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port, or a '/' in the password
        return False


def environment_proxy(target_url: str, owner: str, way_out: str = "") -> str | None:
    """The proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` and ``NO_PROXY`` choose for
    ``target_url``, or None to connect directly. Loopback targets always go direct."""
    target = urlsplit(target_url)
    host = target.hostname or ""
    env = urllib.request.getproxies_environment()
    found = env.get(target.scheme) or env.get("all")
    if not found or _loopback(host) or urllib.request.proxy_bypass(host):
        return None  # an environment proxy is for leaving the machine, not for reaching it
    url = found if "://" in found else f"http://{found}"
    if not _usable_proxy(url):
        raise ConfigError(f"{owner}: the environment's proxy {_masked(url)!r} is not usable; "
                          f"set HTTPS_PROXY / HTTP_PROXY to {_PROXY_FORM}{', ' + way_out if way_out else ''}.")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UpstreamConfig(_Model):
    """One upstream API: where it is, what it speaks, which models it serves."""

    name: str = Field(min_length=1)
    base_url: str
    provider: str = "openai"
    api_key_env: str | None = None  # the name of the env var holding the key, never the key itself
    models: tuple[str, ...] = ("*",)
    timeout: TimeoutConfig = TimeoutConfig()
    # Ask for stream usage (stream_options.include_usage) when the client did not; turn off for
    # OpenAI-compatible servers that reject the option.
    stream_usage: bool = True
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()
    # An HTTP proxy (http://[user:password@]host:port) in front of this upstream. Unset: the
    # environment's HTTPS_PROXY / HTTP_PROXY / ALL_PROXY unless NO_PROXY names the host;
    # "direct": no proxy, whatever the environment says.
    proxy: str | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is None or v == "direct":
            return v
        if not _usable_proxy(v):
            raise ValueError(f'must be "direct" or {_PROXY_FORM}')
        return v

    def proxy_url(self) -> str | None:
        """The proxy this upstream's connections go through, or None for a direct connection."""
        if self.proxy == "direct":
            return None
        if self.proxy:
            return self.proxy
        return environment_proxy(self.base_url, f"Upstream '{self.name}'", "or the upstream's proxy to 'direct'")

    def api_key(self) -> str | None:
        """The upstream key, read from the named environment variable at use."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


class LedgerConfig(_Model):
    """Where call rows go and how they are batched."""

    url: str = "sqlite:///tokenbooth.db"
    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval: float = Field(0.2, gt=0, le=60)  # seconds
    # Rows waiting in memory while the database fails; past it, failing batches go to the
    # spill file (~1 KB of memory per queued row).
    max_queue: int = Field(50_000, ge=1)
    # Where rows the database cannot take are kept for `tokenbooth ledger replay`.
    spill_path: Path = Path("tokenbooth-ledger-spill.jsonl")
    enabled: bool = True
    # Where writers keep the counters that tell, after a crash, how many rows may be missing.
    # Default: beside an SQLite file ("<file>.journal"), else ".tokenbooth-journal" in the
    # working directory.
    journal_dir: Path | None = None

    def journal_path(self) -> Path:
        if self.journal_dir is not None:
            return self.journal_dir
        if self.url.startswith("sqlite:///") and not self.url.endswith(":memory:"):
            return Path(self.url.removeprefix("sqlite:///") + ".journal")
        return Path(".tokenbooth-journal")


class PricingConfig(_Model):
    """Local prices and currency conversion."""

    price_file: Path | None = None
    # USD per one unit of each currency, e.g. {CNY: "0.138"}.
    fx: dict[str, Decimal] = Field(default_factory=lambda: {"USD": Decimal(1), "CNY": Decimal("0.14")})

    @field_validator("fx")
    @classmethod
    def _fx(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        out = {k.upper(): rate for k, rate in v.items()}
        for k, rate in out.items():
            if rate <= 0:
                raise ValueError(f"rate for {k} must be positive")
        out.setdefault("USD", Decimal(1))
        return out


class TokensConfig(_Model):
    """Local token estimates and their reconciliation with reported usage."""

    # "bpe": exact counts for OpenAI model families (o200k_base and cl100k_base, ~7 MB together);
    # "heuristic": the CJK-aware estimate for every model, no vocabularies loaded.
    tokenizer: Literal["bpe", "heuristic"] = "bpe"
    mismatch_threshold: float = Field(0.2, gt=0)  # a relative difference counted as a mismatch
    reconcile_sample: float = Field(0.1, ge=0, le=1)  # share of reported calls also estimated


class MetricsConfig(_Model):
    """Label policy for metrics."""

    extra_models: tuple[str, ...] = ()  # model names kept as labels besides configured and priced ones
    # A `tenant` label on requests, tokens and cost; the first max_tenants tenants seen (configured
    # ones first) keep their name, the rest are folded to "other".
    tenant_labels: bool = False
    max_tenants: int = Field(50, ge=1, le=10_000)


class AuthConfig(_Model):
    """Who may call the gateway.

    ``keys``: every API call needs a tokenbooth key (``tb-...``). ``open``: anyone who can reach
    the gateway may call it. Unset: ``open`` on a loopback address; elsewhere the gateway refuses
    to start while an upstream key is configured, so it never becomes an open relay by accident.
    """

    mode: Literal["keys", "open"] | None = None
    # The name of the env var holding the admin key, which the Alertmanager webhook endpoints
    # (and any admin endpoint) require once keys mode is on.
    admin_key_env: str | None = None
    refresh_interval: float = Field(2.0, gt=0, le=5)  # seconds between looks for created or revoked keys

    def admin_key(self) -> str | None:
        """The admin key, read from the named environment variable at use."""
        return (os.environ.get(self.admin_key_env) or None) if self.admin_key_env else None


_BUDGET_SHORT = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<currency>[A-Za-z]{3})?\s*/\s*(?P<window>[a-z]+)"
                           r"(?::(?P<mode>hard|soft))?\s*$")


class BudgetConfig(_Model):
    """One budget of a tenant or a key: at most ``limit`` in ``currency`` per calendar ``window``.

    ``hard`` refuses calls that could take spend past the limit; ``soft`` only counts (and alerts).
    The short form ``"50/month"``, ``"300CNY/day:soft"`` is accepted wherever a budget is.
    """

    window: Literal["day", "month", "total"]
    limit: Decimal = Field(gt=0)
    currency: str = "USD"
    mode: Literal["hard", "soft"] = "hard"

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _BUDGET_SHORT.match(value)
            if match is None:
                raise ValueError(f"{value!r} is not a budget; write AMOUNT[CURRENCY]/WINDOW[:hard|soft], "
                                 "e.g. 50/month or 300CNY/day:soft")
            return {"limit": match["amount"], "currency": match["currency"] or "USD", "window": match["window"],
                    "mode": match["mode"] or "hard"}
        return value

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        return v.upper()

    @field_validator("limit")
    @classmethod
    def _finite(cls, v: Decimal) -> Decimal:
        if not v.is_finite() or v >= Decimal("9e6"):
            raise ValueError("must be a finite amount below 9,000,000 (budgets are exact to 1e-9 below it)")
        return v

    def short(self) -> str:
        """The budget in its short form, e.g. ``50USD/month``."""
        return f"{self.limit.normalize():f}{self.currency}/{self.window}" + (":soft" if self.mode == "soft" else "")


class LimitsConfig(_Model):
    """Rate limits of a tenant or a key. Unset: no limit."""

    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens per minute, reserved on admission and corrected at settlement
    concurrency: int | None = Field(None, ge=1)  # calls in flight at once


class TenantConfig(_Model):
    """One tenant's budgets and rate limits; its keys may carry tighter ones of their own."""

    budgets: tuple[BudgetConfig, ...] = ()
    limits: LimitsConfig = LimitsConfig()


class BudgetsConfig(_Model):
    """How budgets are windowed and how a call's worst case is reserved."""

    timezone: str = "UTC"  # calendar days and months are counted in this zone
    # Output tokens reserved for a call that sets no max_tokens / max_completion_tokens / max_output_tokens.
    default_max_tokens: int = Field(4096, ge=1)
    # Seconds a reservation is held before it expires (a crashed replica's calls stop blocking the
    # budget); unset: the longest upstream total timeout plus 60 s.
    lease: float | None = Field(None, gt=0)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not a known time zone (an IANA name such as UTC or Asia/Shanghai)") from None
        return v


class RedisConfig(_Model):
    """Shared state for budgets and rate limits across gateway replicas."""

    url: str | None = None  # redis://[:password@]host:6379/0 or rediss://; unset: in-process state
    timeout: float = Field(0.25, gt=0, le=10)  # seconds one admission or settlement may wait for Redis
    # While Redis is unreachable, each replica may spend at most this share of a hard budget's limit
    # on its own (and never more than remained at its last view of Redis).
    outage_credit: float = Field(0.01, ge=0, le=1)
    retry_interval: float = Field(1.0, gt=0)  # seconds between reconnection attempts during an outage
    # Far from every limit (this replica's view of Redis, at most 1 s old, leaves room for 1,000 such
    # calls and 10 % of the limit), a call is admitted without waiting for Redis's answer; Redis
    # still reserves it at once. Near a limit, and for concurrency caps, every admission waits.
    fast_admission: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  # raises on a port that is not a number
            db = parts.path.strip("/") if not v.startswith("unix://") else "0"
            if db and not db.isdigit():
                raise ValueError
        except ValueError:
            raise ValueError("is not a valid Redis URL (redis://[:password@]host:port/db)") from None
        return v


class CacheConfig(_Model):
    """The response cache: exact-match answers, replayed without calling the upstream."""

    enabled: bool = False
    # redis: shared by every replica and worker (the default when redis.url is set); memory: this process
    backend: Literal["memory", "redis"] | None = None
    ttl: float = Field(3600.0, gt=0)  # seconds an answer is kept
    max_ttl: float = Field(86400.0, gt=0)  # seconds a request's x-tokenbooth-cache-ttl may ask for, at most
    max_entry_bytes: int = Field(1024 * 1024, ge=1024)  # an answer (a stream's events together) kept only below it
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)  # the memory backend's bound, per process
    # whose answers a call may get: its tenant's, its key's, or everyone's (an explicit opt-in)
    scope: Literal["tenant", "key", "global"] = "tenant"
    # Calls that ask for a fresh sample (temperature above 0, or unset: the APIs default to 1, with no
    # seed; or n > 1) are neither looked up nor stored unless this is true.
    sampled: bool = False
    timeout: float = Field(0.05, gt=0, le=5)  # seconds a lookup may wait for Redis before the call is a miss
    tenants: dict[str, bool] = Field(default_factory=dict)  # a tenant's calls cached or not (default: cached)
    keys: dict[str, bool] = Field(default_factory=dict)  # by key id; wins over the key's tenant


class RobotConfig(_Model):
    """One chat robot the Alertmanager webhook adapter posts to (``/alertmanager/webhook/{kind}``)."""

    url: str
    secret_env: str | None = None  # DingTalk and Feishu signing secret: the name of the env var holding it

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  # raises on a port that is not a number
        except ValueError:
            raise ValueError("is not a valid URL (check the host and port)") from None
        if not parts.hostname:
            raise ValueError("has no host")
        return v

    def secret(self) -> str | None:
        """The signing secret, read from the named environment variable at use."""
        return (os.environ.get(self.secret_env) or None) if self.secret_env else None


class NotifyConfig(_Model):
    """Where the Alertmanager webhook adapter sends each chat robot's messages."""

    dingtalk: RobotConfig | None = None
    wecom: RobotConfig | None = None
    feishu: RobotConfig | None = None
    slack: RobotConfig | None = None
    timeout: float = Field(10.0, gt=0)  # seconds for one post to a robot


class StackConfig(_Model):
    """Thresholds of the alert rules written by ``tokenbooth stack init`` (ratios are 0-1, times in seconds)."""

    error_rate: float = Field(0.05, gt=0, lt=1)  # failed share of calls: warning
    error_rate_critical: float = Field(0.25, gt=0, lt=1)  # failed share of calls: critical
    min_requests: int = Field(10, ge=1)  # calls in the window before a ratio may alert
    latency_p95: float = Field(30.0, gt=0)
    latency_p99: float = Field(60.0, gt=0)
    ttft_p95: float = Field(5.0, gt=0)
    rate_limited_ratio: float = Field(0.05, gt=0, lt=1)
    server_error_ratio: float = Field(0.02, gt=0, lt=1)
    timeout_ratio: float = Field(0.02, gt=0, lt=1)
    tool_error_ratio: float = Field(0.1, gt=0, lt=1)
    in_flight: int = Field(100, ge=1)  # calls in flight per model
    ledger_queue: int = Field(10000, ge=1)  # ledger rows waiting to be written, per gateway process
    token_spike_factor: float = Field(3.0, gt=1)  # the last 30 min against the previous day's median
    token_spike_min_per_minute: float = Field(1000.0, ge=0)
    currency: str = "USD"  # of the three cost thresholds; converted with pricing.fx
    cost_per_hour: Decimal = Field(Decimal(25), gt=0)
    cost_per_day: Decimal = Field(Decimal(400), gt=0)
    cost_per_month: Decimal = Field(Decimal(10000), gt=0)  # alerts when the 6 h burn projects past it
    budget_warning_ratio: float = Field(0.8, gt=0, lt=1)  # share of a tenant's budget spent before a warning
    pushgateway_stale: float = Field(3600.0, ge=60)  # seconds since a batch job's last push
    slo_availability: float = Field(0.995, ge=0.95, lt=1)  # page alerts need a budget under 1/14.4
    slo_latency: float = Field(30.0, gt=0)  # seconds; must be a bucket of the duration histogram
    slo_latency_target: float = Field(0.99, ge=0.95, lt=1)

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        return v.upper()

    @model_validator(mode="after")
    def _consistent(self) -> StackConfig:
        if self.error_rate_critical <= self.error_rate:
            raise ValueError("error_rate_critical must be above error_rate")
        return self


class RequestLimitsConfig(_Model):
    """What one client request and connection may be: bodies and heads past these are refused before they
    fill memory, slow clients are cut off, and connections are capped before file descriptors run out."""

    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # a JSON call's body (and a webhook's): 413 past it
    max_upload_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # a passed-through body, which streams: 413 past it
    max_model_length: int = Field(256, ge=8, le=4096)  # characters of a model name: 400 past it
    # a request line and headers: 431 past either, while the head still arrives where that can be told
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_headers: int = Field(100, ge=8, le=10_000)
    # seconds for a request's head to arrive, from its connection's opening (or its first byte on a kept-alive
    # connection), and the longest silence within its body: 408 and the connection closed past them
    header_timeout: float = Field(15.0, gt=0, le=3600)
    body_timeout: float = Field(30.0, gt=0, le=3600)
    keep_alive_timeout: int = Field(30, ge=1, le=3600)  # seconds an idle kept-alive connection stays open
    # open connections per process; past it only /healthz and /metrics are served (on a few more).
    # None: half the process's file descriptors (RLIMIT_NOFILE) less 64, at most 10,000
    max_connections: int | None = Field(None, ge=1)


class PassthroughConfig(_Model):
    """Every other ``/v1/`` path (files, batches, audio, images, moderations, ...), forwarded as it is."""

    enabled: bool = True
    # where a call whose body names no model goes (a file upload, a GET); unset: the upstream
    # that serves any model ("*"), else the first upstream
    upstream: str | None = None
    max_json_body: int = Field(8 * 1024 * 1024, ge=1024)  # bytes of a JSON body read whole to find its model
    # share of the list price a batch is billed at, applied to the usage a finished batch reports
    batch_discount: Decimal = Field(Decimal("0.5"), ge=0, le=1)


class Settings(_Model):
    """The whole validated configuration."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    upstreams: tuple[UpstreamConfig, ...] = ()
    # Fallback chains: a model name -> ordered targets tried while the previous ones fail.
    routes: dict[str, tuple[RouteTarget, ...]] = Field(default_factory=dict)
    max_attempts: int = Field(6, ge=1, le=50)  # upstream calls per client call, across fallbacks
    ledger: LedgerConfig = LedgerConfig()
    pricing: PricingConfig = PricingConfig()
    metrics: MetricsConfig = MetricsConfig()
    tokens: TokensConfig = TokensConfig()
    notify: NotifyConfig = NotifyConfig()
    stack: StackConfig = StackConfig()
    auth: AuthConfig = AuthConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    budgets: BudgetsConfig = BudgetsConfig()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    passthrough: PassthroughConfig = PassthroughConfig()
    limits: RequestLimitsConfig = RequestLimitsConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    graceful_shutdown: float = Field(30.0, ge=0)  # seconds to drain in-flight calls on SIGTERM
    workers: int = Field(1, ge=1, le=64)  # gateway processes sharing the port

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstream names must be unique, repeated: {', '.join(dupes)}")
        for model, chain in self.routes.items():
            if not chain:
                raise ValueError(f"route '{model}' has no targets")
            for target in chain:
                if target.upstream not in names:
                    raise ValueError(f"route '{model}' names upstream '{target.upstream}', which is not "
                                     f"configured (upstreams: {', '.join(names) or 'none'})")
        if self.passthrough.upstream is not None and self.passthrough.upstream not in names:
            raise ValueError(f"passthrough.upstream is '{self.passthrough.upstream}', which is not configured "
                             f"(upstreams: {', '.join(names) or 'none'})")
        for tenant, conf in self.tenants.items():
            for budget in conf.budgets:
                if budget.currency not in self.pricing.fx:
                    raise ValueError(f"tenant '{tenant}' has a budget in {budget.currency}; configure "
                                     f"pricing.fx.{budget.currency}")
        return self

    @property
    def auth_mode(self) -> Literal["keys", "open"]:
        """The authentication mode in force: the configured one, else ``open``."""
        return self.auth.mode or "open"

    def check_exposure(self) -> None:
        """Refuse an accidental open relay: ``auth.mode`` unset, a non-loopback address, and an
        upstream key configured that anyone reaching the gateway could spend."""
        if self.auth.mode is not None or _loopback(self.host.strip("[]")):
            return
        keyed = [u.name for u in self.upstreams if u.api_key_env]
        if keyed:
            raise ConfigError(
                f"The gateway would listen on {self.host} and spend the keys of upstream(s) {', '.join(keyed)} for "
                "anyone who reaches it. Set auth.mode: keys (clients need a tokenbooth key; see 'tokenbooth keys "
                "create'), or auth.mode: open to allow it on purpose (TOKENBOOTH_AUTH__MODE=open)."
            )

    def check_upstream_keys(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Each upstream whose ``api_key_env`` names an unset variable, as a warning: the client's own
        ``Authorization`` would be forwarded in its place. In keys mode that is refused: the client's
        header holds its tokenbooth key, and the upstream would get no key of its own."""
        env = os.environ if environ is None else environ
        unset = [(u.name, u.api_key_env) for u in self.upstreams if u.api_key_env and not env.get(u.api_key_env)]
        if unset and self.auth_mode == "keys":
            raise ConfigError("auth.mode is keys and the upstream key variable(s) "
                              + ", ".join(f"{var} (upstream '{name}')" for name, var in unset)
                              + " are not set: set them, or remove api_key_env from those upstreams.")
        return [f"upstream '{name}' has api_key_env {var}, which is not set: the client's own Authorization "
                "header is sent to it instead" for name, var in unset]

    def check_shared_state(self) -> None:
        """Budgets and rate limits held in process are per worker: several workers need Redis."""
        if self.workers > 1 and self.auth_mode == "keys" and self.redis.url is None:
            raise ConfigError(f"workers is {self.workers} with auth.mode keys: budgets and rate limits are shared "
                              "between processes only through Redis; set redis.url, or run one worker.")


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            target[key] = nxt
        target = nxt
    target[path[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def one_line_upstream(url: str) -> dict[str, Any]:
    """The ``--upstream URL`` form: every model to one OpenAI-compatible upstream."""
    return {"name": "default", "base_url": url, "provider": "openai", "models": ["*"]}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key == "upstream":
            out["upstreams"] = [one_line_upstream(value)]
        elif key in ("db", "ledger_url"):
            _set_path(out, ["ledger", "url"], value)
        elif key == "price_file":
            _set_path(out, ["pricing", "price_file"], value)
        else:
            _set_path(out, key.split("__"), value)
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, and where (the file, line and column)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML's errors name the file
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping at the top level")
    return data


def _anchored(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's relative paths (price file, spill file, journal, an SQLite URL's file) made
    relative to the file's folder, not the working directory; paths from flags and the environment
    stay relative to the working directory."""

    def at(value: Any) -> Any:
        return str(folder / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value

    out = dict(data)
    for section, keys in (("ledger", ("spill_path", "journal_dir")), ("pricing", ("price_file",))):
        if isinstance(out.get(section), dict):
            out[section] = {**out[section], **{k: at(v) for k, v in out[section].items() if k in keys}}
    url = out.get("ledger", {}).get("url") if isinstance(out.get("ledger"), dict) else None
    if isinstance(url, str) and url.startswith("sqlite:///") and url.removeprefix("sqlite:///") not in ("", ":memory:"):
        out["ledger"] = {**out["ledger"], "url": "sqlite:///" + at(url.removeprefix("sqlite:///"))}
    return out


def _describe(errors: ValidationError, data: Mapping[str, Any]) -> str:
    parts = []
    for err in errors.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc)
        err["msg"] = err["msg"].removeprefix("Value error, ")
        if not key:  # a check across keys (routes naming upstreams, budget currencies)
            parts.append(f"Config: {err['msg']}.")
            continue
        value: Any = data
        for p in loc:
            try:
                value = value[p]
            except (KeyError, IndexError, TypeError):
                value = None
                break
        if err["type"] == "extra_forbidden":
            parts.append(f"Config key '{key}' is not a known setting.")
        elif err["type"] == "missing":
            parts.append(f"Config key '{key}' is required.")
        elif value is not None and key.startswith("notify.") and key.endswith(".url"):
            # a robot's URL is its secret (DingTalk's access_token, Slack's /services/... path)
            parts.append(f"Config '{key}' has a value that is not usable: {err['msg']}.")
        elif value is not None and not isinstance(value, Mapping | list):
            parts.append(f"Config '{key}' has value {_masked(value)!r}: {err['msg']}.")
        else:
            parts.append(f"Config '{key}': {err['msg']}.")
    return " ".join(parts)


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from file, environment and flags (``overrides``), validated once.

    >>> load_settings(overrides={"upstreams": [one_line_upstream("http://127.0.0.1:9000/v1")]}).port
    8080
    """
    env = os.environ if environ is None else environ
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = _anchored(_read_yaml(Path(path)), Path(path).parent) if path else {}
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data)) from None
