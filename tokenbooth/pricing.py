"""Exact prices and costs.

Two sources, the first that knows the model wins:

1. a local YAML price file, for relays, private models and negotiated rates
   (per million tokens, in USD or CNY, with an optional effective date);
2. the price data bundled with ``genai-prices`` (never fetched at run time).

``genai_prices.calc_price`` costs ~0.2 ms a call, so a model's price is resolved once
into a linear :class:`Price` (one rate per token kind, read off genai-prices itself) and
:func:`cost_of` does the per-call arithmetic in ``Decimal``. Prices genai-prices
expresses as tiers (by prompt length) keep using genai-prices per call.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from tokenbooth.errors import ConfigError
from tokenbooth.memo import remember
from tokenbooth.record import Cost, TokenUsage

__all__ = ["Price", "PriceBook", "batch_cost", "cost_of", "load_price_file", "plain"]

MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


def plain(amount: Decimal, quantum: Decimal | None = None) -> str:
    """An amount as plain digits, as people and spreadsheets read it: never ``0E-12`` or ``1E+1``,
    no trailing zeros, no ``-0``; rounded to ``quantum`` first when given.

    >>> plain(Decimal("0E-12")), plain(Decimal("1E-12")), plain(Decimal("0.750000")), plain(Decimal("1E+1"))
    ('0', '0.000000000001', '0.75', '10')
    """
    if quantum is not None:
        amount = amount.quantize(quantum)
    text = f"{amount.normalize():f}"
    return "0" if text in ("-0", "0") else text

# OpenTelemetry provider names that genai-prices knows under another id.
_GENAI_PROVIDER_IDS = {
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "aws.bedrock": "aws",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
}


@dataclass(frozen=True, slots=True)
class Price:
    """Rates per million tokens of each kind, in ``currency``.

    ``cached_input`` and ``cache_write`` apply to those parts of the input, the rest of
    the input pays ``input``; ``reasoning`` applies to that part of the output.
    ``tiered`` holds a genai-prices price whose rate depends on prompt length.
    """

    model: str
    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    reasoning: Decimal
    currency: str
    source: str
    per_request: Decimal = ZERO
    effective: dt.date | None = None
    provider: str | None = None
    upstream: str | None = None
    tiered: Any = None  # genai_prices ModelPrice, for tiered rates only


def cost_of(price: Price, usage: TokenUsage) -> Decimal:
    """The exact cost of ``usage`` at ``price``, in the price's currency.

    >>> p = Price("m", Decimal(2), Decimal(8), Decimal("0.5"), Decimal(2), Decimal(8), "USD", "test")
    >>> cost_of(p, TokenUsage(input=1000, output=100, cached_input=400))
    Decimal('0.002')
    """
    if price.tiered is not None:
        return _tiered_cost(price.tiered, usage)
    uncached = max(usage.input - usage.cached_input - usage.cache_write, 0)
    plain_output = max(usage.output - usage.reasoning, 0)
    total = (
        uncached * price.input
        + usage.cached_input * price.cached_input
        + usage.cache_write * price.cache_write
        + plain_output * price.output
        + usage.reasoning * price.reasoning
    )
    return total / MILLION + price.per_request


def batch_cost(cost: Cost, rate: Decimal) -> Cost:
    """``cost`` as the Batch API bills it: at ``rate`` of the list price (0.5), its source marked so.

    >>> batch_cost(Cost(Decimal("0.004"), "USD", Decimal("0.004"), "genai-prices"), Decimal("0.5"))
    Cost(amount=Decimal('0.0020'), currency='USD', usd=Decimal('0.0020'), source='genai-prices+batch')
    """
    return Cost(cost.amount * rate, cost.currency, cost.usd * rate, f"{cost.source}+batch")


def _genai_usage(usage: TokenUsage) -> Any:
    from genai_prices import Usage

    values = {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_read_tokens": usage.cached_input,
        "cache_write_tokens": usage.cache_write,
        "output_reasoning_tokens": usage.reasoning,
    }
    return Usage(**{k: v for k, v in values.items() if v})


def _tiered_cost(model_price: Any, usage: TokenUsage) -> Decimal:
    result: Decimal = model_price.calc_price(_genai_usage(usage))["total_price"]
    return result


def _linear_from_genai(model_price: Any, model: str, provider: str) -> Price:
    """Read one rate per token kind off genai-prices by pricing a million of each."""
    from genai_prices.types import TieredPrices

    def rate(**kinds: Any) -> Decimal:
        return Decimal(model_price.calc_price(_genai_usage(TokenUsage(**kinds)))["total_price"])

    tiered = any(isinstance(v, TieredPrices) for v in vars(model_price).values())
    # Probe with a thousand tokens (below any tier threshold, so tiered prices show their base
    # rate) and scale to a million: price * 1000 / 1e6 * 1000 is exact in Decimal.
    m = 1000
    per_request = rate()

    def per_million(**kinds: Any) -> Decimal:
        return (rate(**kinds) - per_request) * 1000

    return Price(
        model=model,
        input=per_million(input=m),
        output=per_million(output=m),
        cached_input=per_million(input=m, cached_input=m),
        cache_write=per_million(input=m, cache_write=m),
        reasoning=per_million(output=m, reasoning=m),
        per_request=per_request,
        currency="USD",
        source="genai-prices",
        provider=provider,
        tiered=model_price if tiered else None,
    )


def _decimal(entry: Mapping[str, Any], key: str, where: str, default: Decimal | None = None) -> Decimal:
    if key not in entry or entry[key] is None:
        if default is None:
            raise ConfigError(f"Price file {where}: '{key}' is required")
        return default
    try:
        value = Decimal(str(entry[key]))
    except InvalidOperation:
        raise ConfigError(f"Price file {where}: '{key}' has value {entry[key]!r}, not a number") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"Price file {where}: '{key}' has value {entry[key]!r}, must be >= 0")
    return value


_ENTRY_KEYS = {"model", "provider", "upstream", "currency", "input", "output", "cached_input", "cache_write",
               "reasoning", "per_request", "effective"}


def load_price_file(path: str | Path, currencies: Iterable[str] = ("USD", "CNY")) -> list[Price]:
    """Read and validate a price file; errors name the entry, key and value.

    Format (prices per million tokens)::

        models:
          - model: deepseek-chat
            upstream: my-relay      # optional: only calls through this upstream
            currency: CNY           # USD (default) or any currency with an fx rate
            input: 2
            output: 8
            cached_input: 0.5       # optional, defaults to input
            effective: 2025-02-01   # optional: applies from this date (UTC)
    """
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as stream:  # a stream, so YAML's errors name the file
            data = yaml.safe_load(stream) or {}
    except OSError as exc:
        raise ConfigError(f"Price file '{p}' cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        from tokenbooth.config import yaml_problem

        raise ConfigError(f"Price file '{p}' is not valid YAML: {yaml_problem(exc)}") from exc
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"Price file '{p}' must have a 'models' list")
    known = {c.upper() for c in currencies}
    prices = []
    for i, entry in enumerate(entries):
        where = f"'{p}' models[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"Price file {where} must be a mapping")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"Price file {where}: unknown key '{sorted(unknown)[0]}'")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"Price file {where}: 'model' is required")
        currency = str(entry.get("currency", "USD")).upper()
        if currency not in known:
            raise ConfigError(
                f"Price file {where}: 'currency' has value {currency!r}; configure pricing.fx.{currency}"
            )
        effective = entry.get("effective")
        if effective is not None and not isinstance(effective, dt.date):
            try:
                effective = dt.date.fromisoformat(str(effective))
            except ValueError:
                raise ConfigError(
                    f"Price file {where}: 'effective' has value {effective!r}, not a YYYY-MM-DD date"
                ) from None
        inp = _decimal(entry, "input", where)
        out = _decimal(entry, "output", where)
        prices.append(Price(
            model=model,
            input=inp,
            output=out,
            cached_input=_decimal(entry, "cached_input", where, inp),
            cache_write=_decimal(entry, "cache_write", where, inp),
            reasoning=_decimal(entry, "reasoning", where, out),
            per_request=_decimal(entry, "per_request", where, ZERO),
            currency=currency,
            source="price-file",
            effective=effective,
            provider=entry.get("provider"),
            upstream=entry.get("upstream"),
        ))
    return prices


_CACHE_TTL = 3600.0  # genai-prices rates can change on a date; re-resolve hourly
# The longest served model name priced (what the ledger keeps): an upstream's answer may name
# anything, and the names looked up are cached.
_SERVED_NAME_MAX = 256


class PriceBook:
    """Resolves the price for a call and computes its :class:`Cost`.

    Thread-safe; resolution is cached per (provider, model), so pricing a call is a dict
    lookup and a few ``Decimal`` multiplications. The cache is bounded (:func:`~tokenbooth.memo.remember`):
    the model is the client's to name, and the served model the upstream's.
    """

    def __init__(self, local: Iterable[Price] = (), fx: Mapping[str, Decimal] | None = None,
                 use_genai_prices: bool = True) -> None:
        self.fx = {k.upper(): v for k, v in (fx or {"USD": Decimal(1)}).items()}
        self._local: dict[str, list[Price]] = {}
        for p in local:
            if p.currency not in self.fx:
                raise ConfigError(f"Price for '{p.model}' is in {p.currency}; configure pricing.fx.{p.currency}")
            self._local.setdefault(p.model, []).append(p)
        self._use_genai = use_genai_prices
        self._cache: dict[tuple[str, str], tuple[float, Price | None]] = {}
        self._lock = threading.Lock()

    @property
    def local_models(self) -> set[str]:
        return set(self._local)

    def known_providers(self) -> set[str]:
        """The provider names a price can be found under: genai-prices' ids, the OpenTelemetry names
        mapped to them, and those the price file names."""
        known = {p.provider for prices in self._local.values() for p in prices if p.provider}
        if self._use_genai:
            from genai_prices import data_snapshot

            known |= {p.id for p in data_snapshot.get_snapshot().providers} | set(_GENAI_PROVIDER_IDS)
        return known

    def warm(self) -> None:
        """Load genai-prices' data now (~100 ms) rather than on the first priced call."""
        if self._use_genai:
            self._genai("openai", "gpt-4o-mini")

    def lookup(self, model: str, *, provider: str = "", upstream: str = "",
               served_model: str | None = None, at: float | None = None) -> Price | None:
        """The price that applies, or None when no source knows the model."""
        served = served_model if served_model and len(served_model) <= _SERVED_NAME_MAX else None
        names = [served, model] if served and served != model else [model]
        for name in names:
            found = self._from_file(name, provider, upstream, at)
            if found is not None:
                return found
        for name in names:
            found = self._genai(provider, name)
            if found is not None:
                return found
        return None

    def cost(self, model: str, usage: TokenUsage, *, provider: str = "", upstream: str = "",
             served_model: str | None = None, at: float | None = None) -> Cost | None:
        """The exact cost of a call, or None when its price is unknown (never a silent zero)."""
        if usage.input == 0 and usage.output == 0:
            return Cost(ZERO, "USD", ZERO, "no-usage")
        price = self.lookup(model, provider=provider, upstream=upstream, served_model=served_model, at=at)
        if price is None:
            return None
        amount = cost_of(price, usage)
        return Cost(amount, price.currency, amount * self.fx[price.currency], price.source)

    def _from_file(self, model: str, provider: str, upstream: str, at: float | None) -> Price | None:
        candidates = self._local.get(model)
        if not candidates:
            return None
        day = dt.datetime.fromtimestamp(at if at is not None else time.time(), dt.UTC).date()
        best: tuple[int, dt.date, Price] | None = None
        for p in candidates:
            if p.upstream is not None and p.upstream != upstream:
                continue
            if p.provider is not None and p.provider != provider:
                continue
            if p.effective is not None and p.effective > day:
                continue
            rank = (p.upstream is not None) * 2 + (p.provider is not None)
            key = (rank, p.effective or dt.date.min, p)
            if best is None or key[:2] > best[:2]:
                best = key
        return best[2] if best else None

    def _genai(self, provider: str, model: str) -> Price | None:
        if not self._use_genai:
            return None
        key = (provider, model)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        price = self._resolve_genai(provider, model)
        with self._lock:
            remember(self._cache, key, (now + _CACHE_TTL, price))
        return price

    @staticmethod
    def _resolve_genai(provider: str, model: str) -> Price | None:
        found = _genai_model(_GENAI_PROVIDER_IDS.get(provider, provider) or None, model)
        if found is None:
            return None
        found_provider, info = found
        model_price = info.get_prices(dt.datetime.now(dt.UTC))
        return _linear_from_genai(model_price, info.id, found_provider.id)


def _genai_model(provider_id: str | None, model: str) -> tuple[Any, Any] | None:
    """genai-prices' provider and model info for a model name, as ``find_provider_model`` finds them,
    or None. Walked here because ``DataSnapshot.find_provider_model`` remembers every name it is asked
    about, without a bound, in the process-wide snapshot; :class:`PriceBook`'s own cache is bounded."""
    from genai_prices import data_snapshot

    providers = data_snapshot.get_snapshot().providers
    ref = model.lower()
    if provider_id is not None:
        in_provider = ref
        if provider_id.lower() == "litellm" and "/" in ref:  # LiteLLM's "provider/model"
            prefix, rest = ref.split("/", 1)
            if data_snapshot.find_provider_by_id(providers, prefix) is not None:
                provider_id, in_provider = prefix, rest
        found = data_snapshot.find_provider_by_id(providers, provider_id)
        info = found.find_model(in_provider, all_providers=providers) if found is not None else None
        if info is not None:
            return found, info
    # no provider, or one genai-prices does not know (a relay) or that lacks the model: by model alone
    found = next((p for p in providers if p.model_match is not None and p.model_match.is_match(ref)), None)
    info = found.find_model(ref, all_providers=providers) if found is not None else None
    return (found, info) if info is not None else None
