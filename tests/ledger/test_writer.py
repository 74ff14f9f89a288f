from __future__ import annotations

import time
import uuid
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from tokenbooth.catalog import Metrics
from tokenbooth.errors import ConfigError
from tokenbooth.ledger.schema import calls, connect
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.record import CallRecord, Cost, Operation, Outcome, TokenUsage


def record(i: int = 0, cost: Decimal | None = Decimal("0.000000123456789012")) -> CallRecord:
    return CallRecord(
        request_id=uuid.uuid4().hex, started_at=time.time(), provider="openai", upstream="u", model="gpt-4o",
        operation=Operation.CHAT, outcome=Outcome.SUCCESS, duration_s=0.1,
        usage=TokenUsage(input=10 + i, output=5, cached_input=2, reasoning=1),
        cost=Cost(cost, "USD", cost, "genai-prices") if cost is not None else None,
    )


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(calls)).scalar_one())


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_rows_are_written_in_batches_and_close_flushes_everything(ledger_url: str) -> None:
    engine = connect(ledger_url)
    registry = CollectorRegistry()
    writer = LedgerWriter(engine, Metrics(registry), batch_size=100, flush_interval=10)
    writer.start()
    for i in range(1050):
        writer.submit(record(i))
    writer.close()
    assert _count(engine) == 1050
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "written"}) == 1050
    assert registry.get_sample_value("tokenbooth_ledger_queue_depth") == 0
    engine.dispose()


def test_money_is_exact_to_a_trillionth_and_sums_exactly(ledger_url: str) -> None:
    engine = connect(ledger_url)
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), flush_interval=0.01)
    writer.start()
    amounts = [Decimal("0.000000123457"), Decimal("12.345678901234"), Decimal("0.1")]
    for a in amounts:
        writer.submit(record(cost=a))
    writer.submit(record(cost=None))
    writer.submit(record(cost=Decimal("0.000000123456789012")))  # finer than 1e-12: rounded to it
    writer.close()
    with engine.connect() as conn:
        stored = conn.execute(sa.select(calls.c.cost_usd).order_by(calls.c.id)).scalars().all()
        total = conn.execute(sa.select(sa.func.sum(calls.c.cost_usd))).scalar_one()
    engine.dispose()
    assert stored == [*amounts, None, Decimal("0.000000123457")]
    assert total == sum(amounts) + Decimal("0.000000123457")


def test_flush_interval_writes_without_a_full_batch(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), batch_size=1000, flush_interval=0.05)
    writer.start()
    writer.submit(record())
    deadline = time.monotonic() + 5
    while _count(engine) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _count(engine) == 1
    writer.close()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_no_prompt_or_completion_column() -> None:
    assert not {"prompt", "messages", "completion", "content", "api_key"} & set(calls.c.keys())


def test_a_database_that_fails_on_close_spills_rows_to_a_file(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    registry = CollectorRegistry()
    spill = tmp_path / "not-yet" / "spill.jsonl"  # its folder is made when needed
    writer = LedgerWriter(engine, Metrics(registry), batch_size=10, flush_interval=60, spill_path=spill)
    writer.start()
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE tokenbooth_calls"))
    for i in range(25):
        writer.submit(record(i))
    writer.close()
    lines = spill.read_bytes().splitlines()
    assert len(lines) == 25
    assert orjson.loads(lines[0])["model"] == "gpt-4o"
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "failed"}) == 25


def test_a_failing_database_is_retried_until_it_recovers(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tokenbooth_calls RENAME TO parked"))
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), batch_size=5, flush_interval=0.01,
                          max_retry_delay=0.05)
    writer.start()
    for i in range(12):
        writer.submit(record(i))
    time.sleep(0.3)  # several failed attempts
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE parked RENAME TO tokenbooth_calls"))
    assert writer.flush(10)
    writer.close()
    assert _count(engine) == 12 and writer.rows_spilled == 0


def test_unusable_urls_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be used"):
        connect("nosuchdb://x")
    with pytest.raises(ConfigError, match="cannot be opened"):
        connect("postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/none")
    try:
        connect("postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/none")
    except ConfigError as exc:
        assert "secret-pw" not in exc.message


def test_sqlite_timestamps_are_the_text_sqlalchemy_writes() -> None:
    import datetime as dt
    import random

    from tokenbooth.ledger.schema import _when

    rng = random.Random(5)
    for ts in [0.0, 1.9999995, 1_800_000_000.25, *(rng.uniform(0, 4e9) for _ in range(5000))]:
        expected = dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        assert _when(ts, sqlite=True) == expected, ts


def test_a_writer_closed_without_starting_still_writes_what_was_submitted(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()))
    for i in range(3):
        writer.submit(record(i))
    writer.close()
    assert _count(engine) == 3
    engine.dispose()


def _nice(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19, counted after the command name


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are a Linux feature")
def test_the_writer_thread_runs_below_the_request_path_and_leaves_the_caller_alone(tmp_path: Path) -> None:
    import threading

    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), flush_interval=0.01)
    mine = _nice(threading.get_native_id())
    writer.start()
    writer.submit(record())
    assert writer.flush(10)
    assert writer._thread.native_id is not None
    assert _nice(writer._thread.native_id) == min(mine + 5, 19)
    writer.close()
    # a writer that never started writes on close() from the caller's thread, at the caller's priority
    idle = LedgerWriter(engine, Metrics(CollectorRegistry()))
    idle.submit(record())
    idle.close()
    assert _nice(threading.get_native_id()) == mine
    assert _count(engine) == 2
    engine.dispose()


def test_rows_go_in_few_statement_sizes_within_the_parameter_limit() -> None:
    from tokenbooth.ledger.writer import _statement_sizes

    assert _statement_sizes(500, 32766 // 29) == [256, 64, 64, 64, 16, 16, 16, 4]
    old_sqlite = _statement_sizes(1000, 999 // 29)  # SQLite before 3.32: 999 parameters
    assert sum(old_sqlite) == 1000 and set(old_sqlite) == {16, 4}
    assert _statement_sizes(3, 0) == [1, 1, 1] and _statement_sizes(0, 100) == []


def test_a_row_the_database_refuses_is_spilled_and_the_others_written(ledger_url: str, tmp_path: Path) -> None:
    import dataclasses

    engine = connect(ledger_url)
    registry = CollectorRegistry()
    spill = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, Metrics(registry), batch_size=8, flush_interval=0.01, spill_path=spill)
    writer.start()
    bad = dataclasses.replace(record(7), model=None)  # type: ignore[arg-type]  # NOT NULL refuses it
    for i in range(20):
        writer.submit(bad if i == 7 else record(i))
    assert writer.flush(10), "a refused row must not hold up the ledger"
    writer.close()
    assert _count(engine) == 19
    lines = spill.read_bytes().splitlines()
    assert len(lines) == 1 and orjson.loads(lines[0])["request_id"] == bad.request_id
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "written"}) == 19
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "failed"}) == 1
    engine.dispose()


def test_a_row_out_of_any_columns_range_is_spilled_alone_and_the_others_written(ledger_url: str,
                                                                                  tmp_path: Path) -> None:
    """A driver error that is not a DataError (SQLite's OverflowError on 10**19) isolates its row too."""
    import dataclasses

    engine = connect(ledger_url)
    registry = CollectorRegistry()
    spill = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, Metrics(registry), batch_size=8, flush_interval=0.01, spill_path=spill)
    writer.start()
    bad = dataclasses.replace(record(3), usage=TokenUsage(input=10**19, output=5))
    for i in range(12):
        writer.submit(bad if i == 3 else record(i))
    assert writer.flush(10), "a row out of range must not hold up the ledger"
    assert registry.get_sample_value("tokenbooth_ledger_queue_depth") == 0
    writer.close()
    assert _count(engine) == 11
    lines = spill.read_bytes().splitlines()
    assert len(lines) == 1 and orjson.loads(lines[0])["request_id"] == bad.request_id
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "written"}) == 11
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "failed"}) == 1
    engine.dispose()


def test_client_strings_fit_their_columns(ledger_url: str) -> None:
    import dataclasses

    engine = connect(ledger_url)
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()))
    long = dataclasses.replace(record(), model="gpt-" + "x" * 300 + "\x00", request_id="r" * 100, tenant="t\x00")
    writer.submit(long)
    writer.close()
    with engine.connect() as conn:
        row = conn.execute(sa.select(calls.c.model, calls.c.request_id, calls.c.tenant)).one()
    assert row.model == ("gpt-" + "x" * 300)[:256] and row.request_id == "r" * 64 and row.tenant == "t"
    assert writer.rows_spilled == 0
    engine.dispose()


def test_postgresql_connections_do_not_prepare_the_many_row_inserts(pg_url: str) -> None:
    engine = connect(pg_url)
    with engine.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None  # type: ignore[union-attr]
    engine.dispose()


def test_during_an_outage_rows_beyond_max_queue_wait_on_disk(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'l.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tokenbooth_calls RENAME TO parked"))
    registry = CollectorRegistry()
    spill = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, Metrics(registry), batch_size=10, flush_interval=0.01, max_retry_delay=0.05,
                          spill_path=spill, max_queue=50)
    for i in range(500):
        writer.submit(record(i))
    writer.start()
    deadline = time.monotonic() + 10
    while writer._queue.qsize() >= 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer._queue.qsize() < 50, "the queue stays bounded while the database is down"
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE parked RENAME TO tokenbooth_calls"))
    assert writer.flush(10)
    writer.close()
    spilled = len(spill.read_bytes().splitlines())
    assert spilled >= 500 - 50 - 40  # all but what waits in the queue and the batch in hand (4 × batch_size)
    assert _count(engine) == 500 - spilled == writer.rows_written
    assert registry.get_sample_value("tokenbooth_ledger_rows_total", {"result": "failed"}) == spilled


def test_a_closed_sqlite_ledger_holds_its_rows_in_the_database_file_alone(tmp_path: Path) -> None:
    import shutil

    engine = connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    writer = LedgerWriter(engine, Metrics(CollectorRegistry()), flush_interval=0.01)
    writer.start()
    for i in range(25):
        writer.submit(record(i))
    writer.close()
    assert (tmp_path / "ledger.db-wal").stat().st_size == 0  # checkpointed and truncated
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "ledger.db", tmp_path / "copy" / "ledger.db")  # the file alone, as users copy it
    engine.dispose()
    copy = sa.create_engine(f"sqlite:///{tmp_path / 'copy' / 'ledger.db'}")
    assert _count(copy) == 25
    copy.dispose()
