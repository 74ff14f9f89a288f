"""Calendar windows and money units of budgets."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from tokenbooth.config import BudgetConfig, load_settings
from tokenbooth.control.policy import budget_check, from_units, to_units, window
from tokenbooth.errors import ConfigError


def _ts(iso: str, zone: str = "UTC") -> float:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_a_month_is_a_calendar_month_in_the_budget_zone() -> None:
    feb = window("month", _ts("2027-02-15T12:00"), ZoneInfo("UTC"))
    assert (feb.period, feb.start, feb.reset) == ("2027-02", dt.datetime(2027, 2, 1), dt.datetime(2027, 3, 1))
    dec = window("month", _ts("2026-12-31T23:59:59"), ZoneInfo("UTC"))
    assert dec.reset == dt.datetime(2027, 1, 1)
    # 2026-12-01 01:00 in Shanghai is still November in UTC: the month follows the zone
    sh = window("month", _ts("2026-12-01T01:00", "Asia/Shanghai"), ZoneInfo("Asia/Shanghai"))
    assert (sh.period, sh.start, sh.reset) == ("2026-12", dt.datetime(2026, 11, 30, 16), dt.datetime(2026, 12, 31, 16))


def test_a_day_across_a_daylight_saving_change_is_23_or_25_hours() -> None:
    ny = ZoneInfo("America/New_York")
    spring = window("day", _ts("2026-03-08T12:00", "America/New_York"), ny)
    assert spring.reset - spring.start == dt.timedelta(hours=23)
    autumn = window("day", _ts("2026-11-01T12:00", "America/New_York"), ny)
    assert autumn.reset - autumn.start == dt.timedelta(hours=25)
    assert window("total", 0, ny).reset is None


def test_budgets_count_in_exact_billionths() -> None:
    assert to_units(Decimal("0.05")) == 50_000_000
    assert to_units(Decimal("1e-10"), up=True) == 1  # a reservation rounds up
    assert to_units(Decimal("1e-10")) == 0
    assert from_units(to_units(Decimal("4999.123456789"))) == Decimal("4999.123456789")


def test_budget_short_forms_and_their_errors() -> None:
    assert BudgetConfig.model_validate("300CNY/day:soft").short() == "300CNY/day:soft"
    assert BudgetConfig.model_validate("50/month").model_dump() == {"window": "month", "limit": Decimal(50),
                                                                    "currency": "USD", "mode": "hard"}
    with pytest.raises(ConfigError, match=r"tenants.t.budgets.0.*not a budget"):
        load_settings(overrides={"tenants": {"t": {"budgets": ["fifty a month"]}}}, environ={})
    with pytest.raises(ConfigError, match=r"configure pricing\.fx\.EUR"):
        load_settings(overrides={"tenants": {"t": {"budgets": ["5EUR/day"]}}}, environ={})
    with pytest.raises(ConfigError, match=r"budgets\.timezone.*not a known time zone"):
        load_settings(overrides={"budgets": {"timezone": "Mars/Olympus"}}, environ={})


def test_every_key_of_one_call_sits_in_its_tenants_cluster_slot() -> None:
    now = _ts("2026-12-01T00:00")
    b = budget_check(BudgetConfig.model_validate("5/day"), tenant="ac{me}", key_id="key_1", now=now,
                     zone=ZoneInfo("UTC"))
    assert b.key.startswith("tb:{ac(me)}:") and b.scope == "key key_1 (tenant 'ac{me}')"
