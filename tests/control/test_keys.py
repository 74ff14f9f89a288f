"""Client keys in the ledger database: hashed, listed, revoked, refreshed into a gateway's ring."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa

from tokenbooth.config import BudgetConfig, LimitsConfig
from tokenbooth.control.keys import KeyRing, KeyStore, describe_limits
from tokenbooth.errors import UsageError
from tokenbooth.ledger.schema import SCHEMA_VERSION, connect


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(connect(f"sqlite:///{tmp_path / 'l.db'}"), environ={})


def test_a_key_is_shown_once_and_stored_only_as_a_keyed_hash(store: KeyStore) -> None:
    key, secret = store.create("acme", name="ci", budgets=(BudgetConfig.model_validate("50/month"),),
                               limits=LimitsConfig(rpm=60))
    assert secret.startswith("tb-") and len(secret) == 46 and secret.startswith(key.prefix)
    with store.engine.connect() as conn:
        dump = str(conn.execute(sa.text("SELECT * FROM tokenbooth_keys")).all())
    assert secret not in dump and secret[len(key.prefix):] not in dump
    assert store.keyed.hash(secret) in dump
    listed = store.list()
    assert [(k.id, k.tenant, k.name, describe_limits(k)) for k in listed] == [(key.id, "acme", "ci",
                                                                                "50USD/month rpm 60")]


def test_replicas_on_one_database_share_the_hashing_secret_and_an_env_var_overrides_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    a, b = KeyStore(connect(url), environ={}), KeyStore(connect(url), environ={})
    assert a.keyed.hash("tb-x") == b.keyed.hash("tb-x")
    c = KeyStore(connect(url), environ={"TOKENBOOTH_KEY_SECRET": "from-env"})
    assert c.keyed.hash("tb-x") != a.keyed.hash("tb-x")


def test_revoke_by_id_or_prefix_refuses_ambiguity_and_the_key_itself(store: KeyStore) -> None:
    key, secret = store.create("acme")
    with pytest.raises(UsageError, match="not the key"):
        store.revoke(secret)
    with pytest.raises(UsageError, match="no key"):
        store.revoke("key_nosuch")
    revoked = store.revoke(key.prefix)
    assert revoked.revoked_at is not None
    assert store.revoke(key.id).revoked_at == revoked.revoked_at  # again: nothing changes


def test_the_ring_takes_new_and_revoked_keys_on_refresh_and_refuses_expired_ones(store: KeyStore) -> None:
    now = dt.datetime(2026, 12, 1, 12, 0)
    ring = KeyRing(store, clock=lambda: now)
    key, secret = store.create("acme", expires_at=now + dt.timedelta(hours=1))
    assert ring.resolve(secret) is None  # not refreshed yet
    ring.refresh()
    found = ring.resolve(secret)
    assert found is not None and found.id == key.id and found.tenant == "acme"
    assert ring.resolve(secret + "x") is None and ring.resolve("tb-" + "a" * 43) is None
    now = now + dt.timedelta(hours=2)
    assert ring.resolve(secret) is None  # expired
    now = now - dt.timedelta(hours=2)
    store.revoke(key.id)
    ring.refresh()
    assert ring.resolve(secret) is None


def test_the_ring_writes_when_keys_were_last_used(store: KeyStore) -> None:
    now = dt.datetime(2026, 12, 1, 12, 0, 5)
    ring = KeyRing(store, clock=lambda: now)
    _, secret = store.create("acme")
    ring.refresh()
    ring.resolve(secret)
    ring.close()
    assert store.list()[0].last_used_at == now


def test_an_old_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # the version 1 schema: calls without the key index, no keys table
        conn.execute(sa.text("CREATE TABLE tokenbooth_meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO tokenbooth_meta VALUES ('schema_version', '1')"))
    engine.dispose()
    upgraded = connect(f"sqlite:///{path}")
    inspector = sa.inspect(upgraded)
    assert "tokenbooth_keys" in inspector.get_table_names()
    assert "ix_tokenbooth_calls_key_time" in {i["name"] for i in inspector.get_indexes("tokenbooth_calls")}
    with upgraded.connect() as conn:
        version = conn.execute(sa.text("SELECT value FROM tokenbooth_meta WHERE key = 'schema_version'")).scalar()
    assert version == str(SCHEMA_VERSION) == "4"


# the columns each schema version added to the calls table
_ADDED = {3: ("response_id",), 4: ("cache", "saved_cost_usd")}


@pytest.mark.parametrize(("old", "database"), [(2, "sqlite"), (3, "sqlite"), (3, "postgresql")])
def test_a_ledger_of_an_older_schema_gains_the_columns_added_since_and_keeps_its_rows(
        tmp_path: Path, request: pytest.FixtureRequest, old: int, database: str) -> None:
    url = f"sqlite:///{tmp_path / f'v{old}.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    engine = connect(url)
    added = [name for version, names in _ADDED.items() if version > old for name in names]
    with engine.begin() as conn:  # back to the old schema: calls without the later columns, one row in it
        for name in added:
            conn.execute(sa.text(f"ALTER TABLE tokenbooth_calls DROP COLUMN {name}"))
        conn.execute(sa.text(f"UPDATE tokenbooth_meta SET value = '{old}' WHERE key = 'schema_version'"))
        conn.execute(sa.text("INSERT INTO tokenbooth_calls (request_id, started_at, provider, upstream, model, "
                             "operation, streamed, outcome, error_type, input_tokens, output_tokens, "
                             "cached_input_tokens, cache_write_tokens, reasoning_tokens, tokens_estimated, "
                             "tokens_mismatch, duration_s, attempts) VALUES ('old', '2026-11-30 10:00:00.000000', "
                             "'openai', 'openai', 'gpt-4o', 'chat', false, 'success', '', 5, 7, 0, 0, 0, false, "
                             "false, 0.5, 1)"))
    engine.dispose()
    upgraded = connect(url)
    with upgraded.connect() as conn:
        row = conn.execute(sa.text(f"SELECT request_id, output_tokens, {', '.join(added)} FROM tokenbooth_calls")).one()
        version = conn.execute(sa.text("SELECT value FROM tokenbooth_meta WHERE key = 'schema_version'")).scalar()
    upgraded.dispose()
    assert tuple(row) == ("old", 7, *[None] * len(added)) and version == str(SCHEMA_VERSION)
    assert max(_ADDED) == SCHEMA_VERSION  # a new version adds its columns to _ADDED
