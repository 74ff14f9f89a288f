from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from tokenbooth.catalog import Metrics
from tokenbooth.ledger.report import render, report
from tokenbooth.ledger.schema import connect
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.record import CallRecord, Cost, Operation, Outcome, TokenUsage


def _at(day: str) -> float:
    return dt.datetime.fromisoformat(day + "T12:00:00+00:00").timestamp()


ROWS = [
    ("2026-10-30", "gpt-4o", "openai", Outcome.SUCCESS, Decimal("0.5")),
    ("2026-10-31", "gpt-4o", "openai", Outcome.SUCCESS, Decimal("0.25")),
    ("2026-11-01", "gpt-4o", "openai", Outcome.ERROR, None),
    ("2026-11-01", "deepseek-chat", "deepseek", Outcome.SUCCESS, Decimal("0.000000000001")),
    ("2026-11-02", "private", "openai", Outcome.SUCCESS, None),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = connect(url)
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()))
    writer.start()
    for day, model, provider, outcome, cost in ROWS:
        usage = TokenUsage(input=100, output=10) if outcome is Outcome.SUCCESS else TokenUsage()
        writer.submit(CallRecord(
            request_id=uuid.uuid4().hex, started_at=_at(day), provider=provider, upstream="u", model=model,
            operation=Operation.CHAT, outcome=outcome, duration_s=1.0, usage=usage,
            cost=Cost(cost, "USD", cost, "genai-prices") if cost is not None else None,
        ))
    writer.close()
    engine.dispose()
    return str(url)


def test_report_by_model_sums_exactly(ledger: str) -> None:
    engine = connect(ledger, create=False)
    rows = {r.group: r for r in report(engine, "model")}
    assert rows["gpt-4o"].requests == 3 and rows["gpt-4o"].errors == 1
    assert rows["gpt-4o"].cost_usd == Decimal("0.75")
    assert rows["deepseek-chat"].cost_usd == Decimal("0.000000000001")
    assert rows["private"].unpriced == 1 and rows["private"].cost_usd is None  # unpriced, never a silent 0
    engine.dispose()


def test_report_by_day_and_month_with_a_date_range(ledger: str) -> None:
    engine = connect(ledger, create=False)
    by_month = {r.group: r.requests for r in report(engine, "month")}
    assert by_month == {"2026-10": 2, "2026-11": 3}
    by_day = {r.group: r.requests for r in report(engine, "day", since=dt.date(2026, 10, 31),
                                                  until=dt.date(2026, 11, 2))}
    assert by_day == {"2026-10-31": 1, "2026-11-01": 2}
    engine.dispose()


def test_formats(ledger: str) -> None:
    engine = connect(ledger, create=False)
    rows = report(engine, "provider")
    engine.dispose()
    data = orjson.loads(render(rows, "json", "provider"))
    assert {d["group"]: d["cost_usd"] for d in data} == {"deepseek": "0.000000000001", "openai": "0.75"}
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv", "provider"))))
    assert [p["provider"] for p in parsed] == ["deepseek", "openai"]
    assert parsed[1]["requests"] == "4"
    assert [p["cost_usd"] for p in parsed] == ["0.000000000001", "0.75"]  # plain digits, never 1E-12
    table = render(rows, "table", "provider")
    assert "TOTAL" in table and "openai" in table and "0.750000" in table


def test_client_chosen_names_cannot_drive_a_terminal_or_a_spreadsheet() -> None:
    from tokenbooth.ledger.report import ReportRow

    names = ["\x1b[31mred\x1b[0m\x07", "=HYPERLINK(\"http://x\",\"y\")", "[bold]markup[/bold]", "-1+2", "plain"]
    rows = [ReportRow(n, 1, 0, 1, 1, 0, 0, 0, Decimal("0.1"), 0) for n in names]
    table = render(rows, "table", "model")
    assert "\x1b" not in table and "\x07" not in table and "\\x1b[31mred" in table
    assert "[bold]markup[/bold]" in table  # shown as written, not taken as markup
    parsed = [r["model"] for r in csv.DictReader(io.StringIO(render(rows, "csv", "model")))]
    assert parsed == [names[0], "'" + names[1], names[2], "'-1+2", "plain"]


def test_costs_are_plain_digits_and_an_unpriced_group_says_so() -> None:
    from tokenbooth.ledger.report import ReportRow

    rows = [ReportRow("free", 2, 0, 10, 1, 0, 0, 0, Decimal("0E-12"), 0),
            ReportRow("private", 1, 0, 10, 1, 0, 0, 0, None, 1)]
    data = orjson.loads(render(rows, "json", "model"))
    assert [d["cost_usd"] for d in data] == ["0", None]
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv", "model"))))
    assert [p["cost_usd"] for p in parsed] == ["0", ""]
    table = render(rows, "table", "model")
    private = next(line for line in table.splitlines() if "private" in line)
    assert "unpriced" in private and "0.000000" not in private
    assert "E-" not in table
