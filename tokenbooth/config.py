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

__all__ = ["CircuitConfig", "LedgerConfig", "NotifyConfig", "PricingConfig", "RetryConfig", "RobotConfig",
           "RouteTarget", "Settings", "StackConfig", "TokensConfig", "UpstreamConfig", "load_settings"]

ENV_PREFIX = "TOKENBOOTH_"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutConfig(_Model):
    """Per-upstream timeouts in seconds. LLM calls are long, connections should be quick."""

    connect: float = Field(10.0, gt=0)
    read: float = Field(300.0, gt=0)  # the longest silence between bytes
    total: float = Field(600.0, gt=0)


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
        return self


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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping at the top level")
    return data


def _describe(errors: ValidationError, data: Mapping[str, Any]) -> str:
    parts = []
    for err in errors.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc)
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
    data: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data)) from None
