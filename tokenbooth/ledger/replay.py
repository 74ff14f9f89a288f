"""Loading a spill file back into the ledger.

Rows the database cannot take (still failing at shutdown, a long outage past
``ledger.max_queue``, a row the database refuses) are appended by the writer to a JSON-lines
spill file (``ledger.spill_path``) instead of being dropped, and
``tokenbooth_ledger_rows_total{result="failed"}`` counts them. Once the
database is back, ``tokenbooth ledger replay FILE`` loads them:

- every line is checked before anything is written, and the rows go in one transaction, so a
  bad file changes nothing;
- rows already in the ledger are skipped (a call by its ``request_id`` and start, a session
  roll-up by its ``session_id``, agent and start: clients may reuse ids), so running a replay
  twice, or after an interrupted one, adds nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Boolean, Column, DateTime, Engine, Float, Integer, Table, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from tokenbooth.errors import LedgerError, UsageError
from tokenbooth.ledger.schema import Money, calls, sessions

__all__ = ["ReplayResult", "replay"]

# the columns that tell one row from another, the first of them indexed
_TABLES = {calls.name: (calls, ("request_id", "started_at")),
           sessions.name: (sessions, ("session_id", "agent", "started_at"))}


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: rows inserted, and rows skipped because the ledger had them."""

    inserted: int
    skipped: int


def replay(engine: Engine, path: Path) -> ReplayResult:
    """Insert the rows of a spill file that the ledger does not hold yet. Raises
    :class:`UsageError` naming the line for a file that is not a spill file."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise UsageError(f"Cannot read the spill file '{path}': {exc.strerror or exc}.") from None
    rows: dict[str, list[dict[str, Any]]] = {calls.name: [], sessions.name: []}
    for number, line in enumerate(lines, 1):
        if line.strip():
            table, row = _parse(line, f"{path}:{number}")
            rows[table.name].append(row)
    inserted = skipped = 0
    try:
        with engine.begin() as conn:
            for name, batch in rows.items():
                table, key = _TABLES[name]
                columns = [table.c[k] for k in key]
                seen: set[tuple[Any, ...]] = set()
                ids = sorted({row[key[0]] for row in batch})
                for at in range(0, len(ids), 500):
                    found = conn.execute(select(*columns).where(columns[0].in_(ids[at:at + 500])))
                    seen.update(tuple(r) for r in found)
                new = []
                for row in batch:
                    identity = tuple(row[k] for k in key)
                    if identity not in seen:
                        seen.add(identity)
                        new.append(row)
                if new:
                    conn.execute(table.insert(), new)
                inserted += len(new)
                skipped += len(batch) - len(new)
    except SQLAlchemyError as exc:
        reason = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()[0][:200]
        raise LedgerError(f"The ledger refused the replay, so nothing was written: {reason}") from None
    return ReplayResult(inserted, skipped)


def _parse(line: bytes, where: str) -> tuple[Table, dict[str, Any]]:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise UsageError(f"{where}: not a JSON line; is this a tokenbooth spill file?") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: not a JSON object; is this a tokenbooth spill file?")
    name = data.pop("table", calls.name)
    if name not in _TABLES:
        raise UsageError(f"{where}: unknown table {name!r}")
    table = _TABLES[name][0]
    row: dict[str, Any] = {}
    for column in table.columns:
        if column.name == "id":
            continue
        if column.name not in data:
            raise UsageError(f"{where}: no '{column.name}' for a {table.name} row")
        row[column.name] = _value(column, data.pop(column.name), where)
    if data:
        raise UsageError(f"{where}: unknown column '{next(iter(data))}' for a {table.name} row")
    return table, row


def _value(column: Column[Any], value: Any, where: str) -> Any:
    """A JSON value as the column's Python type (the spill file holds dates and money as text)."""
    if value is None:
        if not column.nullable:
            raise UsageError(f"{where}: '{column.name}' may not be null")
        return None
    kind = column.type
    try:
        if isinstance(kind, DateTime):
            return dt.datetime.fromisoformat(value)
        if isinstance(kind, Money):
            return Decimal(str(value))
        if isinstance(kind, Boolean):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(kind, Integer):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if isinstance(kind, Float):
            return float(value)
        return str(value)
    except (TypeError, ValueError, InvalidOperation):
        raise UsageError(f"{where}: '{column.name}' has an unusable value {value!r}") from None
