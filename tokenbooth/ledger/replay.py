"""Loading a spill file back into the ledger.

Rows the database cannot take (still failing at shutdown, a long outage past
``ledger.max_queue``, a row the database refuses) are appended by the writer to a JSON-lines
spill file (``ledger.spill_path``) instead of being dropped, and
``tokenbooth_ledger_rows_total{result="failed"}`` counts them. Once the
database is back, ``tokenbooth ledger replay FILE`` loads them:

- every line is checked before anything is written; a bad line (not JSON, a value its column
  cannot hold, a row the database refuses) is reported in one line and left out, and every good
  line is loaded, so one poisoned row cannot keep its neighbours out of the ledger;
- a file with no good line at all is refused (it is not a spill file), and writes nothing;
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
from tokenbooth.ledger.writer import is_outage

__all__ = ["ReplayResult", "replay"]

# the columns that tell one row from another, the first of them indexed
_TABLES = {calls.name: (calls, ("request_id", "started_at")),
           sessions.name: (sessions, ("session_id", "agent", "started_at"))}


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: rows inserted, rows skipped because the ledger had them, and the lines
    left out, each as ``FILE:LINE: why``."""

    inserted: int
    skipped: int
    bad: tuple[str, ...] = ()


def replay(engine: Engine, path: Path) -> ReplayResult:
    """Insert the rows of a spill file that the ledger does not hold yet (see the module). Raises
    :class:`UsageError` for a file that has no good line, :class:`LedgerError` for a ledger that
    refuses everything (down, or not a tokenbooth ledger)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise UsageError(f"Cannot read the spill file '{path}': {exc.strerror or exc}.") from None
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {calls.name: [], sessions.name: []}
    bad: list[str] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                table, row = _parse(line, where)
            except UsageError as exc:
                bad.append(str(exc))
                continue
            rows[table.name].append((where, row))
    if bad and not any(rows.values()):
        raise UsageError(bad[0] + (f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""))
    inserted = skipped = 0
    try:
        for name, batch in rows.items():
            new = _new_rows(engine, name, batch)
            skipped += len(batch) - len(new)
            inserted += _insert(engine, _TABLES[name][0], new, bad)
    except (SQLAlchemyError, OSError) as exc:
        done = "so nothing was written" if not inserted else f"after {inserted} rows were inserted"
        raise LedgerError(f"The ledger refused the replay, {done}: {_why(exc)}") from None
    return ReplayResult(inserted, skipped, tuple(bad))


def _new_rows(engine: Engine, name: str, batch: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The rows the ledger does not hold yet (nor an earlier line of this file)."""
    table, key = _TABLES[name]
    columns = [table.c[k] for k in key]
    seen: set[tuple[Any, ...]] = set()
    ids = sorted({row[key[0]] for _, row in batch})
    with engine.connect() as conn:
        for at in range(0, len(ids), 500):
            found = conn.execute(select(*columns).where(columns[0].in_(ids[at:at + 500])))
            seen.update(tuple(r) for r in found)
    new = []
    for where, row in batch:
        identity = tuple(row[k] for k in key)
        if identity not in seen:
            seen.add(identity)
            new.append((where, row))
    return new


def _insert(engine: Engine, table: Table, new: list[tuple[str, dict[str, Any]]], bad: list[str]) -> int:
    """Insert ``new`` in one transaction; if the ledger refuses one of its rows, row by row,
    reporting each refused one in ``bad``. Returns the rows inserted."""
    if not new:
        return 0
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [row for _, row in new])
        return len(new)
    except Exception as exc:  # a driver's OverflowError is no SQLAlchemyError
        if is_outage(exc):
            raise
    inserted = 0
    for where, row in new:
        try:
            with engine.begin() as conn:
                conn.execute(table.insert(), [row])
            inserted += 1
        except Exception as exc:
            if is_outage(exc):
                raise
            bad.append(f"{where}: the ledger refused the row: {_why(exc)}")
    return inserted


def _why(exc: BaseException) -> str:
    return str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()[0][:200]


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
        if column.name not in data and not column.nullable:
            raise UsageError(f"{where}: no '{column.name}' for a {table.name} row")
        # a column added since the spill was written is nullable, and missing from its lines
        row[column.name] = _value(column, data.pop(column.name, None), where)
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
