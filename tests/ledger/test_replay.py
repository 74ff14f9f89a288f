"""A spill file goes back into the ledger: exactly, once, and not at all when it is bad."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from tests.ledger.test_writer import record
from tokenbooth.catalog import Metrics
from tokenbooth.cli import main
from tokenbooth.errors import UsageError
from tokenbooth.ledger.replay import replay
from tokenbooth.ledger.schema import calls, connect, sessions
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.record import CallRecord, SessionRecord


def _spill(tmp_path: Path, records: list[CallRecord | SessionRecord]) -> Path:
    """Rows spilled the real way: a writer whose database lost its tables before it closed."""
    engine = connect(f"sqlite:///{tmp_path / 'broken.db'}")
    spill = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), flush_interval=60, spill_path=spill)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE tokenbooth_calls"))
        conn.execute(sa.text("DROP TABLE tokenbooth_sessions"))
    for rec in records:
        writer.submit(rec)
    writer.close()
    engine.dispose()
    return spill


def _session() -> SessionRecord:
    return SessionRecord(session_id="s-1", agent="researcher", started_at=time.time(), duration_s=2.5,
                         outcome="success", steps=3, tool_calls=2, tool_errors=1, llm_calls=4, input_tokens=400,
                         output_tokens=90, cost_usd=Decimal("0.001234567890123"), unpriced_calls=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = connect(url)
    yield engine
    engine.dispose()


def test_spilled_rows_replay_exactly_and_only_once(tmp_path: Path, ledger: sa.Engine) -> None:
    records: list[CallRecord | SessionRecord] = [record(i) for i in range(30)]
    records.append(record(99, cost=None))
    records.append(_session())
    spill = _spill(tmp_path, records)
    assert len(spill.read_bytes().splitlines()) == 32

    first = replay(ledger, spill)
    again = replay(ledger, spill)

    assert (first.inserted, first.skipped) == (32, 0)
    assert (again.inserted, again.skipped) == (0, 32)
    with ledger.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(sa.select(calls))}
        session = conn.execute(sa.select(sessions)).one()
    assert len(rows) == 31
    original = records[0]
    assert isinstance(original, CallRecord) and original.cost is not None
    row = rows[original.request_id]
    assert row.cost == Decimal("0.000000123457")  # the ledger keeps money to 1e-12, as the writer does
    assert row.input_tokens == 10 and row.cached_input_tokens == 2 and row.tokens_estimated is False
    assert row.started_at.replace(tzinfo=dt.UTC).timestamp() == pytest.approx(original.started_at, abs=1e-6)
    unpriced = records[30]
    assert isinstance(unpriced, CallRecord) and rows[unpriced.request_id].cost is None
    assert session.cost_usd == Decimal("0.001234567890") and session.tool_errors == 1


@pytest.mark.parametrize(("line", "message"), [
    (b"not json", "spill.jsonl:2: not a JSON line"),
    (b"[1, 2]", "spill.jsonl:2: not a JSON object"),
    (b'{"request_id": "x"}', "spill.jsonl:2: no 'started_at' for a tokenbooth_calls row"),
])
def test_a_bad_line_names_itself_and_the_good_ones_are_loaded(tmp_path: Path, line: bytes, message: str) -> None:
    spill = _spill(tmp_path, [record(1)])
    spill.write_bytes(spill.read_bytes() + line + b"\n")
    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    result = replay(engine, spill)
    assert (result.inserted, len(result.bad)) == (1, 1) and message.split(":", 2)[2] in result.bad[0]
    assert result.bad[0].startswith(str(spill) + ":2:")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(calls)).scalar_one() == 1


def test_a_file_with_no_good_line_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    spill = tmp_path / "notes.txt"
    spill.write_bytes(b"hello\nworld\n")
    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    with pytest.raises(UsageError, match=r"notes.txt:1: not a JSON line; is this a tokenbooth spill file\? "
                                         r"\(and 1 more bad lines\)"):
        replay(engine, spill)


def test_a_row_the_ledger_cannot_hold_is_reported_and_its_neighbours_loaded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spill = _spill(tmp_path, [record(1), record(2), record(3)])
    lines = spill.read_bytes().splitlines()
    # 10**19 tokens: out of SQLite's INTEGER range (its driver raises OverflowError, no DataError)
    poisoned = re.sub(rb'"input_tokens":\d+', b'"input_tokens":10000000000000000000', lines[1])
    spill.write_bytes(b"\n".join([lines[0], poisoned, lines[2], b"garbage"]) + b"\n")
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    connect(db).dispose()
    assert main(["ledger", "replay", str(spill), "--db", db]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("2 rows inserted, 0 already in the ledger")
    assert f"not loaded: {spill}:2: the ledger refused the row: " in err
    assert f"not loaded: {spill}:4: not a JSON line" in err
    assert err.strip().splitlines()[-1] == (f"tokenbooth: error: 2 lines of '{spill}' were not loaded (listed "
                                            "above); the others were")
    assert "Traceback" not in err


def test_a_bad_value_or_column_is_refused(tmp_path: Path) -> None:
    spill = _spill(tmp_path, [record(1)])
    good = spill.read_bytes()
    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    spill.write_bytes(good.replace(b'"input_tokens":11', b'"input_tokens":"eleven"'))
    with pytest.raises(UsageError, match="'input_tokens' has an unusable value 'eleven'"):
        replay(engine, spill)
    spill.write_bytes(good.replace(b'"model":', b'"prompt":"secret","model":'))
    with pytest.raises(UsageError, match="unknown column 'prompt'"):
        replay(engine, spill)


def test_the_cli_replays_and_says_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spill = _spill(tmp_path, [record(1), record(2)])
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    connect(db).dispose()
    assert main(["ledger", "replay", str(spill), "--db", db]) == 0
    assert capsys.readouterr().out.startswith("2 rows inserted, 0 already in the ledger")
    assert main(["ledger", "replay", str(tmp_path / "missing.jsonl"), "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenbooth: error: No spill file at") and err.count("\n") == 1
    assert main(["ledger", "replay", str(spill), "--db", f"sqlite:///{tmp_path / 'none.db'}"]) != 0
    assert "No ledger at" in capsys.readouterr().err


def test_calls_that_reuse_a_request_id_are_all_kept(tmp_path: Path) -> None:
    import dataclasses

    first = dataclasses.replace(record(1), request_id="client-retry-1")
    second = dataclasses.replace(record(2), request_id="client-retry-1", started_at=first.started_at + 1.5)
    spill = _spill(tmp_path, [first, second])
    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert replay(engine, spill).inserted == 2
    assert replay(engine, spill).skipped == 2


def test_a_database_that_refuses_gives_one_line_and_writes_nothing(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spill = _spill(tmp_path, [record(1)])
    empty = tmp_path / "empty.db"
    empty.touch()  # a file, but no tables: a rebuilt database that was never migrated
    assert main(["ledger", "replay", str(spill), "--db", f"sqlite:///{empty}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tokenbooth: error: No ledger at 'sqlite:///{empty}': the database has no tokenbooth_calls")
    assert err.count("\n") == 1
    with sa.create_engine(f"sqlite:///{empty}").connect() as conn:
        assert sa.inspect(conn).get_table_names() == []  # nothing created, nothing written


def test_a_spill_from_before_a_column_was_added_still_replays(tmp_path: Path) -> None:
    spill = _spill(tmp_path, [record(1)])
    spill.write_bytes(spill.read_bytes().replace(b',"response_id":null', b""))  # as tokenbooth 0.x wrote it
    assert b"response_id" not in spill.read_bytes()
    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert replay(engine, spill).inserted == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(calls.c.response_id)).scalar_one() is None
