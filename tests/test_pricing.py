from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price

from tokenbooth.errors import ConfigError
from tokenbooth.pricing import PriceBook, cost_of, load_price_file
from tokenbooth.record import TokenUsage

MODELS = [
    ("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "o3-mini"), ("openai", "gpt-4.1"),
    ("openai", "text-embedding-3-small"), ("anthropic", "claude-3-5-sonnet"), ("anthropic", "claude-sonnet-4"),
    ("anthropic", "claude-3-5-haiku"), ("deepseek", "deepseek-chat"), ("deepseek", "deepseek-reasoner"),
    ("google", "gemini-2.5-pro"), ("google", "gemini-2.0-flash"), ("mistral", "mistral-large-latest"),
]
USAGES = [
    TokenUsage(input=1000, output=500),
    TokenUsage(input=3000, output=200, cached_input=1024),
    TokenUsage(input=5000, output=100, cached_input=1000, cache_write=2000),
    TokenUsage(input=400, output=700, reasoning=300),
    TokenUsage(input=250_000, output=1234, cached_input=100_000, reasoning=1000),  # above tier thresholds
    TokenUsage(input=1, output=1),
]


def _genai(provider: str, model: str, u: TokenUsage) -> Decimal:
    kwargs = {"input_tokens": u.input, "output_tokens": u.output, "cache_read_tokens": u.cached_input,
              "cache_write_tokens": u.cache_write, "output_reasoning_tokens": u.reasoning}
    return calc_price(Usage(**{k: v for k, v in kwargs.items() if v}), model, provider_id=provider).total_price


@pytest.mark.parametrize(("provider", "model", "usage"),
                         [(p, m, u) for (p, m), u in itertools.product(MODELS, USAGES)])
def test_cached_linear_price_equals_genai_prices_exactly(provider: str, model: str, usage: TokenUsage) -> None:
    book = PriceBook()
    cost = book.cost(model, usage, provider=provider)
    assert cost is not None and cost.source == "genai-prices" and cost.currency == "USD"
    assert cost.usd == _genai(provider, model, usage)


def test_cost_of_is_exact_decimal_math() -> None:
    book = PriceBook()
    price = book.lookup("gpt-4o-mini", provider="openai")
    assert price is not None
    u = TokenUsage(input=1_000_003, output=7, cached_input=999_999)
    expected = (Decimal(4) * Decimal("0.15") + Decimal(999_999) * Decimal("0.075") + 7 * Decimal("0.6")) / 10**6
    assert cost_of(price, u) == expected


def test_unknown_model_has_no_price_and_no_usage_costs_zero() -> None:
    book = PriceBook()
    assert book.cost("no-such-model-xyz", TokenUsage(input=10, output=1), provider="openai") is None
    zero = book.cost("no-such-model-xyz", TokenUsage(), provider="openai")
    assert zero is not None and zero.usd == 0 and zero.source == "no-usage"


def test_relay_provider_unknown_to_genai_prices_falls_back_to_the_model(tmp_path: Path) -> None:
    book = PriceBook()
    price = book.lookup("gpt-4o-mini", provider="my-relay")
    assert price is not None and price.provider == "openai"


PRICE_FILE = """
models:
  - model: gpt-4o-mini
    input: 0.1
    output: 0.4
  - model: deepseek-chat
    upstream: relay
    currency: CNY
    input: 2
    output: 8
    cached_input: 0.5
    effective: 2025-02-09
  - model: deepseek-chat
    upstream: relay
    currency: CNY
    input: 1
    output: 4
    effective: 2099-01-01
"""


def test_price_file_wins_over_genai_prices_and_converts_cny(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(PRICE_FILE)
    book = PriceBook(load_price_file(f), {"USD": Decimal(1), "CNY": Decimal("0.14")})
    mini = book.cost("gpt-4o-mini", TokenUsage(input=1000, output=1000), provider="openai")
    assert mini is not None and mini.source == "price-file" and mini.usd == Decimal("0.0005")
    relay = book.cost("deepseek-chat", TokenUsage(input=1000, output=1000, cached_input=400),
                      provider="deepseek", upstream="relay")
    assert relay is not None and relay.currency == "CNY"
    assert relay.amount == (Decimal(600) * 2 + Decimal(400) * Decimal("0.5") + Decimal(1000) * 8) / 10**6
    assert relay.usd == relay.amount * Decimal("0.14")
    # the entry is bound to the relay upstream: elsewhere genai-prices applies
    direct = book.cost("deepseek-chat", TokenUsage(input=1000, output=1000), provider="deepseek", upstream="x")
    assert direct is not None and direct.source == "genai-prices"


def test_effective_date_picks_the_price_in_force(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(PRICE_FILE)
    book = PriceBook(load_price_file(f), {"USD": Decimal(1), "CNY": Decimal("0.14")})
    later = dt.datetime(2099, 6, 1, tzinfo=dt.UTC).timestamp()
    earlier = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()
    now_price = book.lookup("deepseek-chat", upstream="relay")
    later_price = book.lookup("deepseek-chat", upstream="relay", at=later)
    assert now_price is not None and now_price.input == 2
    assert later_price is not None and later_price.input == 1
    before = book.lookup("deepseek-chat", provider="deepseek", upstream="relay", at=earlier)
    assert before is not None and before.source == "genai-prices"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [{model: m, input: 1}]", "'output' is required"),
        ("models: [{model: m, input: x, output: 1}]", "'input' has value 'x', not a number"),
        ("models: [{model: m, input: -1, output: 1}]", "must be >= 0"),
        ("models: [{model: m, input: 1, output: 1, currency: EUR}]", "configure pricing.fx.EUR"),
        ("models: [{model: m, input: 1, output: 1, effective: soon}]", "not a YYYY-MM-DD date"),
        ("models: [{model: m, input: 1, output: 1, inptu: 2}]", "unknown key 'inptu'"),
        ("models: [{input: 1, output: 1}]", "'model' is required"),
        ("prices: []", "must have a 'models' list"),
    ],
)
def test_bad_price_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_price_file(f)
    assert (message in info.value.message and "models[0]" in info.value.message) or "models' list" in message


def test_prices_of_distinct_model_names_are_remembered_within_a_bound() -> None:
    from tokenbooth.memo import MEMO_LIMIT

    book = PriceBook()
    for n in range(MEMO_LIMIT + 10):
        assert book.lookup(f"client-model-{n}", provider="openai") is None
    assert 0 < len(book._cache) <= MEMO_LIMIT
    assert book.lookup("gpt-4o-mini", provider="openai") is not None


def test_genai_prices_keeps_nothing_per_model_name_it_is_asked_about() -> None:
    import tracemalloc

    book = PriceBook()
    book.warm()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for n in range(300):  # known and unknown names, with a known provider, an unknown one and none
            for provider in ("openai", "a-relay", ""):
                book.lookup(f"gpt-4o-mini-{n}", provider=provider)
                book.lookup(f"client-model-{n}", provider=provider)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    in_genai = [tracemalloc.Filter(True, "*genai_prices*")]
    grown = sum(s.size_diff for s in after.filter_traces(in_genai).compare_to(before.filter_traces(in_genai),
                                                                              "filename"))
    assert grown < 10_000, f"genai-prices grew {grown} bytes over 1,800 distinct names"


def test_an_absurdly_long_served_model_is_priced_as_the_model_asked_for_and_not_cached() -> None:
    book = PriceBook()
    asked = book.lookup("gpt-4o-mini", provider="openai")
    assert book.lookup("gpt-4o-mini", provider="openai", served_model="gpt-4o-" + "x" * 100_000) == asked
    assert all(len(model) < 1000 for _, model in book._cache)


def test_amounts_print_as_plain_digits() -> None:
    from tokenbooth.pricing import plain

    assert [plain(Decimal(v)) for v in ("0E-12", "-0", "1E-12", "0.7500", "1E+2", "12.5")] == \
        ["0", "0", "0.000000000001", "0.75", "100", "12.5"]
    assert plain(Decimal("0.0000000004"), Decimal("1e-9")) == "0"


def test_known_providers_are_genai_prices_ids_their_otel_names_and_the_price_files() -> None:
    from tokenbooth.pricing import Price

    one = Decimal(1)
    local = Price(model="m", input=one, output=one, cached_input=one, cache_write=one, reasoning=one,
                  currency="USD", source="price-file", provider="myrelay")
    known = PriceBook([local]).known_providers()
    assert {"openai", "anthropic", "deepseek", "aws.bedrock", "myrelay"} <= known and "nosuchprov" not in known
