"""Cost and usage reports from the ledger: grouped sums, rendered as a table, CSV or JSON."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import Engine, case, func, select
from sqlalchemy.sql.elements import ColumnElement

from tokenbooth.errors import UsageError
from tokenbooth.ledger.schema import calls
from tokenbooth.pricing import plain

__all__ = ["GROUPS", "ReportRow", "render", "report", "spend_since"]

Group = Literal["model", "provider", "upstream", "tenant", "key", "day", "month"]
GROUPS: tuple[str, ...] = ("model", "provider", "upstream", "tenant", "key", "day", "month")


@dataclass(frozen=True)
class ReportRow:
    """Sums over one group of calls. ``cost_usd`` covers priced calls, and is None when the group's
    calls with tokens are all unpriced (never a silent 0); ``unpriced`` counts the unpriced ones."""

    group: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal | None
    unpriced: int
    cache_hits: int = 0  # calls answered by the response cache (their cost is 0)
    saved_usd: Decimal = Decimal(0)  # what those hits' answers would have cost


def _group_expr(engine: Engine, by: str) -> ColumnElement[Any]:
    column = {"model": calls.c.model, "provider": calls.c.provider, "upstream": calls.c.upstream,
              "tenant": calls.c.tenant, "key": calls.c.key_id}.get(by)
    if column is not None:
        return column
    if by not in ("day", "month"):
        raise UsageError(f"cannot group by {by!r}; choose one of {', '.join(GROUPS)}")
    if engine.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d" if by == "day" else "%Y-%m", calls.c.started_at)
    if engine.dialect.name == "postgresql":
        return func.to_char(calls.c.started_at, "YYYY-MM-DD" if by == "day" else "YYYY-MM")
    return func.substr(func.cast(calls.c.started_at, calls.c.model.type), 1, 10 if by == "day" else 7)


def report(engine: Engine, by: str = "model", since: dt.date | None = None,
           until: dt.date | None = None) -> list[ReportRow]:
    """Sum calls per group between ``since`` (inclusive) and ``until`` (exclusive), UTC dates."""
    key = _group_expr(engine, by).label("grp")
    has_tokens = (calls.c.input_tokens + calls.c.output_tokens) > 0
    stmt = select(
        key,
        func.count().label("requests"),
        func.sum(case((calls.c.outcome == "error", 1), else_=0)).label("errors"),
        func.sum(calls.c.input_tokens).label("input_tokens"),
        func.sum(calls.c.output_tokens).label("output_tokens"),
        func.sum(calls.c.cached_input_tokens).label("cached_input_tokens"),
        func.sum(calls.c.cache_write_tokens).label("cache_write_tokens"),
        func.sum(calls.c.reasoning_tokens).label("reasoning_tokens"),
        func.sum(calls.c.cost_usd).label("cost_usd"),
        func.sum(case((calls.c.cost_usd.is_(None) & has_tokens, 1), else_=0)).label("unpriced"),
        func.sum(case((calls.c.cache == "hit", 1), else_=0)).label("cache_hits"),
        func.sum(calls.c.saved_cost_usd).label("saved_usd"),
    ).group_by(key).order_by(key)
    if since is not None:
        stmt = stmt.where(calls.c.started_at >= dt.datetime.combine(since, dt.time()))
    if until is not None:
        stmt = stmt.where(calls.c.started_at < dt.datetime.combine(until, dt.time()))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        ReportRow(
            group=str(r.grp) if r.grp is not None else "-",
            requests=int(r.requests),
            errors=int(r.errors or 0),
            input_tokens=int(r.input_tokens or 0),
            output_tokens=int(r.output_tokens or 0),
            cached_input_tokens=int(r.cached_input_tokens or 0),
            cache_write_tokens=int(r.cache_write_tokens or 0),
            reasoning_tokens=int(r.reasoning_tokens or 0),
            cost_usd=Decimal(r.cost_usd) if r.cost_usd is not None else None if r.unpriced else Decimal(0),
            unpriced=int(r.unpriced or 0),
            cache_hits=int(r.cache_hits or 0),
            saved_usd=Decimal(r.saved_usd) if r.saved_usd is not None else Decimal(0),
        )
        for r in rows
    ]


def spend_since(engine: Engine, *, tenant: str, key_id: str | None, since: dt.datetime, currency: str,
                fx: Mapping[str, Decimal]) -> Decimal:
    """What a tenant, or one of its keys, has spent since ``since`` (naive UTC), in ``currency``:
    costs priced in it as they are, the others through their USD amount and ``fx``."""
    where = [calls.c.tenant == tenant, calls.c.started_at >= since]
    if key_id is not None:
        where.append(calls.c.key_id == key_id)
    stmt = select(
        func.sum(case((calls.c.currency == currency, calls.c.cost), else_=None)),
        func.sum(case((calls.c.currency != currency, calls.c.cost_usd), else_=None)),
    ).where(*where)
    with engine.connect() as conn:
        same, other = conn.execute(stmt).one()
    total = Decimal(same) if same is not None else Decimal(0)
    if other is not None:
        total += Decimal(other) / fx[currency]
    return total


def _total(rows: list[ReportRow]) -> ReportRow:
    costs = [r.cost_usd for r in rows if r.cost_usd is not None]

    def added(name: str) -> int:
        return sum(getattr(r, name) for r in rows)

    return ReportRow("TOTAL", added("requests"), added("errors"), added("input_tokens"), added("output_tokens"),
                     added("cached_input_tokens"), added("cache_write_tokens"), added("reasoning_tokens"),
                     sum(costs, start=Decimal(0)) if costs else None, added("unpriced"), added("cache_hits"),
                     sum((r.saved_usd for r in rows), start=Decimal(0)))


def _cost(r: ReportRow) -> str | None:
    return plain(r.cost_usd) if r.cost_usd is not None else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """A client-chosen name (a model, a tenant) safe for a terminal: control characters (escape
    sequences among them) shown as ``\\xNN``, never sent to the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _csv_cell(text: str) -> str:
    """A client-chosen name safe for a spreadsheet: one that starts like a formula (``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return) gets a leading ``'`` so it is read as text."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def render(rows: list[ReportRow], fmt: str, by: str) -> str:
    """Render rows as ``table`` (with a total), ``csv`` or ``json`` (exact decimal strings)."""
    if fmt == "json":
        return orjson.dumps([{**asdict(r), "cost_usd": _cost(r), "saved_usd": plain(r.saved_usd)} for r in rows],
                            option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([by, *list(asdict(rows[0]))[1:]] if rows else [by])
        for r in rows:
            writer.writerow([_csv_cell(r.group), *(_cost(r) or "" if k == "cost_usd" else
                                                   plain(v) if k == "saved_usd" else str(v)
                                                   for k, v in list(asdict(r).items())[1:])])
        return out.getvalue()
    if fmt != "table":
        raise UsageError(f"unknown format {fmt!r}; choose table, csv or json")
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"tokenbooth usage by {by}", show_footer=False)
    hits = any(r.cache_hits for r in rows)  # the cache's columns, once it answered a call
    for name in (by, "requests", "errors", "input", "output", "cached in", "reasoning", "cost USD", "unpriced",
                 *(("cache hits", "saved USD") if hits else ())):
        table.add_column(name, justify="left" if name == by else "right")
    shown = [*rows, _total(rows)] if rows else []
    for r in shown:
        table.add_row(escape(_printable(r.group)), f"{r.requests:,}", f"{r.errors:,}", f"{r.input_tokens:,}",
                      f"{r.output_tokens:,}", f"{r.cached_input_tokens:,}", f"{r.reasoning_tokens:,}",
                      f"{r.cost_usd:,.6f}" if r.cost_usd is not None else "unpriced", f"{r.unpriced:,}",
                      *((f"{r.cache_hits:,}", f"{r.saved_usd:,.6f}") if hits else ()),
                      end_section=r is rows[-1])
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=False, color_system=None).print(
        table if rows else "No calls in the ledger for this period.")
    return buf.getvalue()
