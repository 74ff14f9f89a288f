"""``tokenbooth budgets``: every budget's limit, spent, reserved, remaining and reset time.

Spent comes from the ledger (what its rows say, in the budget's currency); reserved, the
worst case of calls in flight, from Redis when it is configured (in-process reservations
live only inside the gateway).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import Engine

from tokenbooth.config import Settings
from tokenbooth.control.keys import KeyStore
from tokenbooth.control.policy import Check, budget_check, from_units
from tokenbooth.ledger.report import spend_since
from tokenbooth.pricing import plain

__all__ = ["BudgetStatus", "budget_status", "render_budgets"]


@dataclass(frozen=True)
class BudgetStatus:
    scope: str
    window: str
    period: str
    mode: str
    currency: str
    limit: Decimal
    spent: Decimal
    reserved: Decimal | None  # None: not known outside the gateway (no Redis)
    reset: str

    @property
    def remaining(self) -> Decimal:
        return self.limit - self.spent - (self.reserved or Decimal(0))


async def _reserved(url: str, checks: list[Check], timeout: float) -> list[Decimal | None]:
    from tokenbooth.control.resp import RedisAddress, RedisConnection

    conn = RedisConnection(RedisAddress.parse(url), timeout)
    try:
        out: list[Decimal | None] = []
        for c in checks:
            value = await conn.execute("HGET", c.key, "reserved")
            out.append(from_units(int(value)) if value else Decimal(0))
        return out
    except (OSError, TimeoutError, ConnectionError):
        return [None] * len(checks)
    finally:
        await conn.close()


def budget_status(settings: Settings, engine: Engine, now: float | None = None) -> list[BudgetStatus]:
    """The state of every tenant budget in the config and every budget of an active key."""
    now = time.time() if now is None else now
    zone = ZoneInfo(settings.budgets.timezone)
    checks = [budget_check(b, tenant=t, key_id=None, now=now, zone=zone)
              for t, conf in settings.tenants.items() for b in conf.budgets]
    checks += [budget_check(b, tenant=k.tenant, key_id=k.id, now=now, zone=zone)
               for k in KeyStore(engine).active().values() for b in k.budgets]
    reserved: list[Decimal | None] = [None] * len(checks)
    if settings.redis.url and checks:
        reserved = asyncio.run(_reserved(settings.redis.url, checks, max(settings.redis.timeout, 1.0)))
    rows = []
    for c, held in zip(checks, reserved, strict=True):
        assert c.window is not None
        spent = spend_since(engine, tenant=c.tenant, key_id=c.key_id, since=c.window.start, currency=c.currency,
                            fx=settings.pricing.fx)
        rows.append(BudgetStatus(c.scope, c.window.kind, c.window.period, "hard" if c.hard else "soft", c.currency,
                                 from_units(c.limit), spent, held,
                                 c.window.reset.isoformat(sep=" ") + " UTC" if c.window.reset else "never"))
    return rows


def _plain(d: Decimal) -> str:
    return plain(d, Decimal("1e-9"))  # budgets are exact to 1e-9


def render_budgets(rows: list[BudgetStatus], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps([{"scope": r.scope, "window": r.window, "period": r.period, "mode": r.mode,
                              "currency": r.currency, "limit": _plain(r.limit), "spent": _plain(r.spent),
                              "reserved": _plain(r.reserved) if r.reserved is not None else None,
                              "remaining": _plain(r.remaining), "resets": r.reset} for r in rows],
                            option=orjson.OPT_INDENT_2).decode() + "\n"
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title="tokenbooth budgets")
    for name in ("scope", "window", "mode", "limit", "spent", "reserved", "remaining", "resets"):
        table.add_column(name, justify="right" if name in ("limit", "spent", "reserved", "remaining") else "left")
    for r in rows:
        table.add_row(r.scope, f"{r.window} {r.period}", r.mode, f"{_plain(r.limit)} {r.currency}", _plain(r.spent),
                      _plain(r.reserved) if r.reserved is not None else "n/a (no Redis)", _plain(r.remaining),
                      r.reset)
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(
        table if rows else "No budgets: add them under tenants: in the config, or with 'keys create --budget'.")
    return buf.getvalue()
