"""The ledger's schema: one row per call, in SQLite or PostgreSQL through SQLAlchemy Core."""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator, TypeEngine

from tokenbooth.errors import ConfigError
from tokenbooth.record import CallRecord, SessionRecord

__all__ = ["SCHEMA_VERSION", "calls", "connect", "engine_for", "keys", "meta", "metadata", "row_from_record",
           "session_row", "sessions"]

# 1: calls and sessions. 2: client keys, and calls indexed by key and time. 3: calls' response_id.
# 4: calls' cache result and the cost a cache hit saved.
SCHEMA_VERSION = 4
_PICO = Decimal("1e12")


class Money(TypeDecorator[Decimal]):
    """An exact amount of money.

    ``NUMERIC(24, 12)`` on PostgreSQL. SQLite has no exact decimal type, so there the
    amount is stored as an integer count of 1e-12 units: sums stay exact, and a row
    is exact to a trillionth of a dollar.
    """

    impl = Numeric(24, 12)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(24, 12, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return int((Decimal(value) * _PICO).to_integral_value())
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)) / _PICO
        return Decimal(value)


metadata = MetaData()

_Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY

calls = Table(
    "tokenbooth_calls",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("started_at", DateTime(timezone=False), nullable=False, comment="UTC"),
    Column("provider", String(64), nullable=False),
    Column("upstream", String(128), nullable=False),
    Column("model", String(256), nullable=False, comment="the model the caller asked for"),
    Column("served_model", String(256)),
    Column("operation", String(32), nullable=False),
    Column("streamed", Boolean, nullable=False, default=False),
    Column("outcome", String(16), nullable=False),
    Column("error_type", String(32), nullable=False, default=""),
    Column("http_status", Integer),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cached_input_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("tokens_estimated", Boolean, nullable=False, default=False),
    Column("tokens_mismatch", Boolean, nullable=False, default=False,
           comment="a local estimate differed from the reported usage beyond the threshold"),
    Column("cost", Money(), comment="in `currency`; NULL when no price is known"),
    Column("currency", String(8)),
    Column("cost_usd", Money()),
    Column("price_source", String(32)),
    Column("duration_s", Float, nullable=False),
    Column("ttft_s", Float),
    Column("attempts", Integer, nullable=False, default=1),
    Column("fallback_path", String(512)),
    Column("session_id", String(128)),
    Column("tenant", String(128)),
    Column("key_id", String(64)),
    Column("response_id", String(128),
           comment="the stored response or batch the call created or read: a background response's rows share it"),
    Column("cache", String(16), comment="the response cache's result: hit, miss, bypass, store_skipped; NULL: off"),
    Column("saved_cost_usd", Money(), comment="a cache hit: what its stored answer would cost now (the hit costs 0)"),
    Index("ix_tokenbooth_calls_started_at", "started_at"),
    Index("ix_tokenbooth_calls_model_time", "model", "started_at"),
    Index("ix_tokenbooth_calls_provider_time", "provider", "started_at"),
    Index("ix_tokenbooth_calls_tenant_time", "tenant", "started_at"),
    Index("ix_tokenbooth_calls_request_id", "request_id"),
    Index("ix_tokenbooth_calls_key_time", "key_id", "started_at"),
)

sessions = Table(
    "tokenbooth_sessions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("session_id", String(128), nullable=False),
    Column("agent", String(128), nullable=False),
    Column("started_at", DateTime(timezone=False), nullable=False, comment="UTC"),
    Column("duration_s", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("steps", Integer, nullable=False),
    Column("tool_calls", Integer, nullable=False),
    Column("tool_errors", Integer, nullable=False),
    Column("llm_calls", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost_usd", Money(), nullable=False),
    Column("unpriced_calls", Integer, nullable=False),
    Index("ix_tokenbooth_sessions_started_at", "started_at"),
    Index("ix_tokenbooth_sessions_session_id", "session_id"),
)

meta = Table(
    "tokenbooth_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

keys = Table(
    "tokenbooth_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("prefix", String(16), nullable=False, comment="the first characters of the key, shown to tell keys apart"),
    Column("hash", String(64), nullable=False, unique=True, comment="HMAC-SHA256 of the key; the key is never stored"),
    Column("tenant", String(128), nullable=False),
    Column("name", String(128)),
    Column("budgets", String(1024), nullable=False, default="[]", comment="JSON list of budgets"),
    Column("rpm", Integer),
    Column("tpm", BigInteger),
    Column("concurrency", Integer),
    Column("created_at", DateTime(timezone=False), nullable=False, comment="UTC"),
    Column("expires_at", DateTime(timezone=False), comment="UTC"),
    Column("revoked_at", DateTime(timezone=False), comment="UTC"),
    Column("last_used_at", DateTime(timezone=False), comment="UTC"),
    Index("ix_tokenbooth_keys_prefix", "prefix"),
)


_INSERT_COLUMNS = tuple(str(c.name) for c in calls.columns if c.name != "id")
# the declared length of each string column: client-supplied values are cut to it (see _fit)
_LENGTH = {str(c.name): int(c.type.length) for c in calls.columns if isinstance(c.type, String) and c.type.length}
_SESSION_LENGTH = {str(c.name): int(c.type.length) for c in sessions.columns
                   if isinstance(c.type, String) and c.type.length}
_SESSION_COLUMNS = tuple(str(c.name) for c in sessions.columns if c.name != "id")


def insert_sql(dialect: Dialect, table: Table = calls) -> str:
    """A plain INSERT of one row in the DBAPI's own parameter style, for ``executemany``.

    The writer binds ready-made tuples (see :func:`row_values`) instead of going through
    SQLAlchemy's per-row type processing, which costs more CPU than the whole proxy path.
    """
    columns = [str(c.name) for c in table.columns if c.name != "id"]
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})"


_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted (swapped whole: thread-safe)


def _when(ts: float, sqlite: bool) -> Any:
    """A call's start as SQLAlchemy's SQLite DateTime text ("YYYY-MM-DD HH:MM:SS.ffffff", UTC),
    or as a naive UTC datetime for other databases."""
    if not sqlite:
        return dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None)
    second = int(ts)
    micros = round((ts - second) * 1_000_000)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    global _last_second
    cached = _last_second
    if cached[0] != second:  # rows arrive in time order: format each second once
        cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)))
        _last_second = cached
    return f"{cached[1]}.{micros:06d}"


def _money(amount: Decimal | None, sqlite: bool) -> Any:
    if amount is None or not sqlite:
        return amount
    return int((amount * _PICO).to_integral_value())


def session_values(rec: SessionRecord, sqlite: bool) -> tuple[Any, ...]:
    """A session roll-up as a tuple in ``insert_sql(dialect, sessions)`` order."""
    return (_fit(rec.session_id, _SESSION_LENGTH["session_id"]), _fit(rec.agent, _SESSION_LENGTH["agent"]),
            _when(rec.started_at, sqlite), rec.duration_s,
            rec.outcome, rec.steps, rec.tool_calls, rec.tool_errors, rec.llm_calls, rec.input_tokens, rec.output_tokens,
            _money(rec.cost_usd, sqlite), rec.unpriced_calls)


def session_row(rec: SessionRecord) -> dict[str, Any]:
    """A session roll-up as a column -> value mapping."""
    return dict(zip(_SESSION_COLUMNS, session_values(rec, sqlite=False), strict=True))


def row_values(rec: CallRecord, sqlite: bool) -> tuple[Any, ...]:
    """The ledger row of a record as a tuple in :func:`insert_sql` order, stored as
    :class:`Money` and SQLAlchemy's SQLite ``DateTime`` would store them."""
    u = rec.usage
    cost = rec.cost
    when = _when(rec.started_at, sqlite)
    amount = _money(cost.amount, sqlite) if cost else None
    usd = _money(cost.usd, sqlite) if cost else None
    if sqlite:
        streamed: Any = int(rec.streamed)
        estimated: Any = int(u.estimated)
        mismatch: Any = int(rec.tokens_mismatch)
    else:
        streamed, estimated, mismatch = rec.streamed, u.estimated, rec.tokens_mismatch
    return (
        _fit(rec.request_id, _LENGTH["request_id"]), when, _fit(rec.provider, _LENGTH["provider"]),
        _fit(rec.upstream, _LENGTH["upstream"]), _fit(rec.model, _LENGTH["model"]),
        _fit(rec.served_model, _LENGTH["served_model"]), rec.operation.value, streamed, rec.outcome.value,
        rec.error_type.value, rec.http_status, u.input, u.output, u.cached_input, u.cache_write, u.reasoning,
        estimated, mismatch, amount, cost.currency if cost else None, usd, cost.source if cost else None,
        rec.duration_s, rec.ttft_s, rec.attempts, _fit(rec.fallback_path, _LENGTH["fallback_path"]),
        _fit(rec.session_id, _LENGTH["session_id"]), _fit(rec.tenant, _LENGTH["tenant"]),
        _fit(rec.key_id, _LENGTH["key_id"]), _fit(rec.response_id, _LENGTH["response_id"]), rec.cache,
        _money(rec.saved_cost.usd, sqlite) if rec.saved_cost is not None else None,
    )


def _fit(value: str | None, limit: int) -> str | None:
    """A string as its column holds it: at most ``limit`` characters and no NUL. Model names and
    request ids come from clients, and PostgreSQL refuses a longer value or a NUL."""
    if value is None or (len(value) <= limit and "\x00" not in value):
        return value
    return value.replace("\x00", "")[:limit]


def row_from_record(rec: CallRecord) -> dict[str, Any]:
    """The ledger row of a record as a column -> value mapping. Holds no prompt, completion or key."""
    return dict(zip(_INSERT_COLUMNS, row_values(rec, sqlite=False), strict=True))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=5000")  # first: switching to WAL waits for another connection's lock
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _migrate(conn: Any, version: int) -> None:
    """Bring a ledger of an older schema up to this one, in the caller's transaction.

    ``create_all`` has already added missing tables; what it does not do for tables that
    exist (indexes, columns) is done here, one step per version.
    """
    if version < 2:
        for index in calls.indexes:
            if index.name == "ix_tokenbooth_calls_key_time":
                index.create(conn, checkfirst=True)
    added = {3: ("response_id",), 4: ("cache", "saved_cost_usd")}
    for step, names in added.items():
        if version >= step:
            continue
        present = {c["name"] for c in inspect(conn).get_columns(calls.name)}
        for name in names:
            if name not in present:
                column = calls.c[name]
                conn.execute(text(f"ALTER TABLE {calls.name} ADD COLUMN {column.name} "
                                  f"{column.type.compile(dialect=conn.dialect)}"))
    conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))


def engine_for(url: str) -> Engine:
    """An engine for ``url``, not yet connected: a URL no driver can serve is refused here, before
    anything is created. :func:`connect` is the one that opens the ledger."""
    if url.startswith(("postgres://", "postgresql://")):
        # psycopg 3 is the driver we ship with; SQLAlchemy's default would be psycopg2.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # psycopg prepares a statement after 5 uses and keys its cache on the query and its
    # parameters' types; the writer's many-row INSERTs would fill it with megabyte-sized keys.
    connect_args = {"prepare_threshold": None} if url.startswith("postgresql+psycopg://") else {}
    try:
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise ConfigError(f"Ledger URL '{safe_url(url)}' cannot be used: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def connect(url: str, *, create: bool = True) -> Engine:
    """An engine for the ledger at ``url``, with the schema created and checked.

    SQLite runs in WAL mode so reports can read while the gateway writes.
    """
    engine = engine_for(url)
    try:
        if create:
            metadata.create_all(engine)
            with engine.begin() as conn:
                version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
                if version is None:
                    conn.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(version) > SCHEMA_VERSION:
                    raise ConfigError(
                        f"Ledger at '{safe_url(url)}' has schema version {version}, newer than this "
                        f"tokenbooth ({SCHEMA_VERSION}); upgrade tokenbooth"
                    )
                elif int(version) < SCHEMA_VERSION:
                    _migrate(conn, int(version))
        else:
            with engine.connect() as conn:
                conn.execute(select(1))
                if not inspect(conn).has_table(calls.name):
                    raise ConfigError(f"No ledger at '{safe_url(url)}': the database has no {calls.name} table; "
                                      "pass the --db URL a gateway writes to")
    except ConfigError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        raise ConfigError(f"Ledger at '{safe_url(url)}' cannot be opened: {exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0]}") from None
    return engine
