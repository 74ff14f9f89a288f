"""Client keys: created, listed and revoked in the ledger database, stored only as a keyed hash.

A key is ``tb-`` and 43 random URL-safe characters (256 bits). The database holds its id, a
short visible prefix and ``HMAC-SHA256(server secret, key)``; the key itself is shown once, at
creation, and never stored, logged or put in a metric. The server secret is made on first use
and kept in the ledger's ``tokenbooth_meta`` table, so every replica sharing the database finds
it; ``TOKENBOOTH_KEY_SECRET`` overrides it (then every replica needs the same value).

Gateways hold the active keys in memory (:class:`KeyRing`) and look in the database every
``auth.refresh_interval`` seconds for a change: one row is read, and the keys only when it
changed, so a key created or revoked anywhere takes effect on every replica within seconds.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tokenbooth.config import BudgetConfig, LimitsConfig
from tokenbooth.errors import ConfigError, UsageError
from tokenbooth.ledger.schema import keys as keys_table
from tokenbooth.ledger.schema import meta

__all__ = ["KEY_PREFIX", "ClientKey", "KeyRing", "KeyStore", "Keyed", "looks_like_key"]

log = logging.getLogger("tokenbooth.control")

KEY_PREFIX = "tb-"
SECRET_ENV = "TOKENBOOTH_KEY_SECRET"
_SECRET_ROW = "key_hash_secret"
_VERSION_ROW = "keys_version"
_VISIBLE = 11  # "tb-" and 8 characters: enough to tell keys apart, far too little to guess one
_BUDGETS = TypeAdapter(tuple[BudgetConfig, ...])


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 128


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One client key as the database holds it (never the key itself)."""

    id: str
    prefix: str
    tenant: str
    name: str | None = None
    budgets: tuple[BudgetConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    created_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None  # naive UTC
    revoked_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _from_row(row: Mapping[Any, Any]) -> ClientKey:
    try:
        budgets = _BUDGETS.validate_python(orjson.loads(str(row["budgets"] or "[]")))
    except (orjson.JSONDecodeError, ValidationError):
        log.error("key %s has budgets the gateway cannot read; it is refused until revoked", row["id"])
        budgets = (BudgetConfig(window="total", limit=1, mode="hard"),)  # refuse, never allow unlimited
    return ClientKey(
        id=str(row["id"]), prefix=str(row["prefix"]), tenant=str(row["tenant"]),
        name=str(row["name"]) if row["name"] is not None else None, budgets=budgets,
        limits=LimitsConfig(rpm=row["rpm"], tpm=row["tpm"], concurrency=row["concurrency"]),
        created_at=row["created_at"], expires_at=row["expires_at"],
        revoked_at=row["revoked_at"], last_used_at=row["last_used_at"],
    )


class Keyed:
    """Hashes keys with the server secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.digest(self._secret, key.encode(), "sha256").hex()


class KeyStore:
    """The keys in the ledger database: create, list, revoke, and read the active ones.

    >>> store = KeyStore(connect("sqlite:///tokenbooth.db"))          # doctest: +SKIP
    >>> key, secret = store.create("acme", name="ci")                  # doctest: +SKIP
    """

    def __init__(self, engine: Engine, environ: Mapping[str, str] | None = None) -> None:
        self.engine = engine
        env = os.environ if environ is None else environ
        override = env.get(SECRET_ENV)
        self.keyed = Keyed(override.encode() if override else self._server_secret())

    def _server_secret(self) -> bytes:
        """The hashing secret kept in the database, made on first use (replicas racing agree)."""
        for _ in range(2):
            with self.engine.begin() as conn:
                found = conn.execute(select(meta.c.value).where(meta.c.key == _SECRET_ROW)).scalar()
            if found is not None:
                return bytes.fromhex(found)
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(meta).values(key=_SECRET_ROW, value=secrets.token_hex(32)))
            except IntegrityError:
                continue  # another replica made it first: read theirs
        raise ConfigError("the ledger holds no key-hashing secret and none could be stored")

    def _changed(self, conn: object) -> None:
        """Mark the key set changed: a new random version, so concurrent writers never collide."""
        value = uuid.uuid4().hex
        done = conn.execute(update(meta).where(meta.c.key == _VERSION_ROW).values(value=value))  # type: ignore[attr-defined]
        if not done.rowcount:
            conn.execute(insert(meta).values(key=_VERSION_ROW, value=value))  # type: ignore[attr-defined]

    def create(self, tenant: str, *, name: str | None = None, budgets: tuple[BudgetConfig, ...] = (),
               limits: LimitsConfig | None = None, expires_at: dt.datetime | None = None,
               now: dt.datetime | None = None) -> tuple[ClientKey, str]:
        """Make a key; returns it and its secret, which is shown once and kept nowhere."""
        if not tenant or len(tenant) > 128:
            raise UsageError("--tenant must be 1 to 128 characters")
        if name is not None and len(name) > 128:
            raise UsageError("--name must be at most 128 characters")
        limits = limits or LimitsConfig()
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ClientKey(id="key_" + secrets.token_hex(6), prefix=secret[:_VISIBLE], tenant=tenant, name=name,
                        budgets=budgets, limits=limits, created_at=now or _utcnow().replace(microsecond=0),
                        expires_at=expires_at)
        with self.engine.begin() as conn:
            conn.execute(insert(keys_table).values(
                id=key.id, prefix=key.prefix, hash=self.keyed.hash(secret), tenant=tenant, name=name,
                budgets=_BUDGETS.dump_json(budgets).decode(), rpm=limits.rpm, tpm=limits.tpm,
                concurrency=limits.concurrency, created_at=key.created_at, expires_at=expires_at))
            self._changed(conn)
        return key, secret

    def list(self) -> list[ClientKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(keys_table).order_by(keys_table.c.created_at, keys_table.c.id)).mappings()
            return [_from_row(r) for r in rows]

    def revoke(self, id_or_prefix: str, now: dt.datetime | None = None) -> ClientKey:
        """Revoke a key named by its id or its prefix; an ambiguous prefix is refused."""
        if id_or_prefix.startswith(KEY_PREFIX) and len(id_or_prefix) > _VISIBLE:
            raise UsageError("give the key's id or its prefix (as 'tokenbooth keys list' shows it), not the key")
        column = keys_table.c.prefix if id_or_prefix.startswith(KEY_PREFIX) else keys_table.c.id
        with self.engine.begin() as conn:
            rows = conn.execute(select(keys_table).where(column == id_or_prefix)).mappings().all()
            if not rows:
                raise UsageError(f"no key has the id or prefix {id_or_prefix!r} (see 'tokenbooth keys list')")
            if len(rows) > 1:
                raise UsageError(f"the prefix {id_or_prefix!r} names {len(rows)} keys; revoke by id: "
                                 + ", ".join(str(r["id"]) for r in rows))
            key = _from_row(rows[0])
            if key.revoked_at is None:
                when = now or _utcnow().replace(microsecond=0)
                conn.execute(update(keys_table).where(keys_table.c.id == key.id).values(revoked_at=when))
                self._changed(conn)
                key = _from_row({**rows[0], "revoked_at": when})
        return key

    def version(self) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == _VERSION_ROW)).scalar()
        return None if value is None else str(value)

    def active(self) -> dict[str, ClientKey]:
        """The keys not revoked, by hash (expiry is checked at use: it passes without a change)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(keys_table).where(keys_table.c.revoked_at.is_(None))).mappings().all()
        return {str(r["hash"]): _from_row(r) for r in rows}

    def touch(self, ids: set[str], when: dt.datetime) -> None:
        """Record that these keys were used (batched by the key ring, not per call)."""
        with self.engine.begin() as conn:
            conn.execute(update(keys_table).where(keys_table.c.id.in_(sorted(ids))).values(last_used_at=when))


_SEEN_MAX = 10_000  # secrets remembered between reloads; only valid ones, so callers cannot grow it


class KeyRing:
    """The active keys of a gateway, refreshed from the database on a background thread.

    ``resolve(secret)`` is a hash and a dict lookup. Keys used since the last refresh get their
    ``last_used_at`` written on the next one.
    """

    def __init__(self, store: KeyStore, *, interval: float = 2.0,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.store = store
        self.interval = interval
        self.clock = clock
        self._by_hash: dict[str, ClientKey] = {}
        # secrets seen since the last reload, and their keys: a hit skips the HMAC (~3-20 µs). It is
        # swapped with ``_by_hash`` as one tuple, so a key revoked by a reload is never found in it.
        self._view: tuple[dict[str, ClientKey], dict[str, ClientKey]] = (self._by_hash, {})
        self._version: str | None = None
        self._used: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenbooth-keys", daemon=True)
        self.refresh()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._touch()

    def resolve(self, secret: str) -> ClientKey | None:
        """The active, unexpired key with this secret, or None."""
        by_hash, seen = self._view
        key = seen.get(secret)
        if key is None:
            key = by_hash.get(self.store.keyed.hash(secret))
            if key is not None and len(seen) < _SEEN_MAX:
                seen[secret] = key
        if key is None or (key.expires_at is not None and key.expired(self.clock())):
            return None
        self._used.add(key.id)
        return key

    def refresh(self) -> None:
        version = self.store.version()
        if version != self._version or self._version is None:
            self._by_hash = self.store.active()  # swapped whole: readers on the loop never see a half set
            self._view = (self._by_hash, {})
            self._version = version

    def _touch(self) -> None:
        if self._used:
            used, self._used = self._used, set()
            try:
                self.store.touch(used, self.clock().replace(microsecond=0))
            except SQLAlchemyError as exc:
                log.warning("could not record when %d keys were last used: %s", len(used), exc.__class__.__name__)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except SQLAlchemyError as exc:  # the database is away: keep the keys we have
                log.warning("key refresh failed, keeping the %d keys known: %s", len(self._by_hash),
                            exc.__class__.__name__)
            self._touch()


def describe_limits(key: ClientKey) -> str:
    """A key's own budgets and limits in one short string, e.g. ``50USD/month rpm 60``."""
    parts = [b.short() for b in key.budgets]
    parts += [f"{name} {value}" for name, value in (("rpm", key.limits.rpm), ("tpm", key.limits.tpm),
                                                    ("concurrency", key.limits.concurrency)) if value]
    return " ".join(parts) or "-"


def render_keys(keys: list[ClientKey], fmt: str) -> str:
    """The key list as a table or JSON (never a secret: the database has none)."""

    def when(t: dt.datetime | None) -> str:
        return t.isoformat(sep=" ", timespec="seconds") if t else "-"

    if fmt == "json":
        return orjson.dumps([{"id": k.id, "prefix": k.prefix, "tenant": k.tenant, "name": k.name,
                              "budgets": [b.short() for b in k.budgets], "rpm": k.limits.rpm, "tpm": k.limits.tpm,
                              "concurrency": k.limits.concurrency, "created": when(k.created_at),
                              "expires": when(k.expires_at), "last_used": when(k.last_used_at),
                              "revoked": when(k.revoked_at)} for k in keys], option=orjson.OPT_INDENT_2).decode() + "\n"
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title="tokenbooth keys (times UTC)")
    for name in ("id", "prefix", "tenant", "name", "limits", "created", "expires", "last used", "revoked"):
        table.add_column(name)
    for k in keys:
        table.add_row(k.id, k.prefix, k.tenant, k.name or "-", describe_limits(k), when(k.created_at),
                      when(k.expires_at), when(k.last_used_at), when(k.revoked_at))
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(
        table if keys else "No keys yet: make one with 'tokenbooth keys create --tenant NAME'.")
    return buf.getvalue()
