"""What applies to a call: the budgets and rate limits of its tenant and key, as checks.

A :class:`Check` is one thing a store must admit a call against: a budget in a calendar
window, a token bucket (RPM or TPM), or a concurrency cap. Checks carry their store key,
which names the tenant in a Redis Cluster hash tag (``{acme}``) so that every key one call
touches sits in one slot. Amounts are integers: budgets count in units of 1e-9 of their
currency, so sums stay exact in Redis's Lua (doubles, exact to 2**53: 9 million units).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from tokenbooth.config import BudgetConfig, LimitsConfig

__all__ = ["NANO", "Check", "Window", "budget_check", "from_units", "rate_checks", "to_units", "window"]

NANO = Decimal("1e9")
Kind = Literal["budget", "rate", "concurrency"]


def to_units(amount: Decimal, *, up: bool = False) -> int:
    """An amount of money in integer units of 1e-9 (reservations round up, costs to nearest)."""
    return int((amount * NANO).to_integral_value(ROUND_CEILING if up else ROUND_HALF_EVEN))


def from_units(units: int | float) -> Decimal:
    return Decimal(int(units)) / NANO


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window: its id (``2026-12``), when it started and when it resets (UTC)."""

    kind: str
    period: str
    start: dt.datetime  # naive UTC, for ledger queries
    reset: dt.datetime | None  # naive UTC; None for ``total``


def window(kind: str, now: float, zone: ZoneInfo) -> Window:
    """The window of kind ``day``, ``month`` or ``total`` that holds ``now``, in ``zone``.

    >>> w = window("month", 1_796_000_000, ZoneInfo("UTC")); (w.period, w.reset.isoformat())
    ('2026-11', '2026-12-01T00:00:00')
    """
    if kind == "total":
        return Window("total", "all", dt.datetime(1970, 1, 1), None)
    local = dt.datetime.fromtimestamp(now, zone)
    if kind == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + dt.timedelta(days=1, hours=2)).replace(hour=0)  # safe across DST changes
        period = start.strftime("%Y-%m-%d")
    else:
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + dt.timedelta(days=32)).replace(day=1)
        period = start.strftime("%Y-%m")
    # re-anchor in the zone: the offset at midnight may differ from the offset now (DST)
    start = start.replace(tzinfo=None).replace(tzinfo=zone)
    nxt = nxt.replace(tzinfo=None).replace(tzinfo=zone)

    def utc(t: dt.datetime) -> dt.datetime:
        return t.astimezone(dt.UTC).replace(tzinfo=None)

    return Window(kind, period, utc(start), utc(nxt))


@dataclass(frozen=True, slots=True)
class Check:
    """One limit a call is admitted against (what a call reserves of it is passed beside it)."""

    kind: Kind
    key: str  # the store key, e.g. "tb:{acme}:b:t:month:2026-12"
    scope: str  # for messages: "tenant 'acme'" or "key key_ab12 (tenant 'acme')"
    tenant: str
    limit: int  # budget units, bucket capacity, or calls in flight
    name: str = ""  # budget window kind, "rpm"/"tpm", or "concurrency"
    hard: bool = True
    per_second: float = 0.0  # token bucket refill
    currency: str = "USD"
    window: Window | None = None
    key_id: str | None = None  # set for a key's own budget (for seeding from the ledger)
    expire_at: int = 0  # unix seconds at which the store may forget the state; 0: never


def _tag(tenant: str) -> str:
    # "{" and "}" would end the hash tag early
    return tenant.replace("{", "(").replace("}", ")")


def budget_check(budget: BudgetConfig, *, tenant: str, key_id: str | None, now: float, zone: ZoneInfo) -> Check:
    win = window(budget.window, now, zone)
    owner = f"k:{key_id}" if key_id else "t"
    scope = f"key {key_id} (tenant '{tenant}')" if key_id else f"tenant '{tenant}'"
    limit = to_units(budget.limit)
    expire = int(win.reset.replace(tzinfo=dt.UTC).timestamp()) + 86400 if win.reset else 0
    return Check("budget", f"tb:{{{_tag(tenant)}}}:b:{owner}:{budget.currency}:{limit}:{win.kind}:{win.period}",
                 scope, tenant, limit, name=budget.window, hard=budget.mode == "hard", currency=budget.currency,
                 window=win, key_id=key_id, expire_at=expire)


def rate_checks(limits: LimitsConfig, *, tenant: str, key_id: str | None) -> list[Check]:
    owner = f"k:{key_id}" if key_id else "t"
    scope = f"key {key_id} (tenant '{tenant}')" if key_id else f"tenant '{tenant}'"
    base = f"tb:{{{_tag(tenant)}}}:{owner}"
    out = []
    if limits.rpm:
        out.append(Check("rate", f"{base}:rpm:{limits.rpm}", scope, tenant, limits.rpm, "rpm",
                         per_second=limits.rpm / 60))
    if limits.tpm:
        out.append(Check("rate", f"{base}:tpm:{limits.tpm}", scope, tenant, limits.tpm, "tpm",
                         per_second=limits.tpm / 60))
    if limits.concurrency:
        out.append(Check("concurrency", f"{base}:conc", scope, tenant, limits.concurrency, "concurrency"))
    return out
