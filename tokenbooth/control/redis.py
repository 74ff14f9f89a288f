"""Budgets, rate limits and concurrency shared by every replica, in Redis.

Each admission and each settlement is one Lua script (``lua/*.lua`` beside this module,
loaded once with ``SCRIPT LOAD`` and run with ``EVALSHA``): atomic, and idempotent by call
id. Every key a call touches carries its tenant as a hash tag, so one script's keys sit in
one Redis Cluster slot. Failures (no connection, no answer within ``redis.timeout``) raise
:class:`StoreUnavailable`; the controller then falls back to its in-process state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenbooth.control.policy import Check
from tokenbooth.control.resp import RedisAddress, RedisConnection, RedisReplyError
from tokenbooth.control.store import Admission, StoreUnavailable

__all__ = ["RedisStore"]

_LUA = Path(__file__).with_name("lua")
_KIND = {"budget": "b", "rate": "r", "concurrency": "c"}
EPOCH_KEY = "tb:epoch"
SETTLED_TTL = 3600  # seconds a settled call's marker keeps a replayed settlement from counting twice
SETTLE_DEFER = 0.002  # seconds a settlement may wait to share a write with the next command


def _script(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def _keys(call_id: str, checks: Sequence[Check]) -> list[str]:
    tag = checks[0].key.split("}", 1)[0] + "}"  # every check of a call has its tenant's tag
    keys = [f"{tag}:call:{call_id}"]
    for c in checks:
        keys += (c.key, c.key + ":leases")
    return keys


def _ttl(check: Check, now: float) -> int:
    """Seconds Redis keeps a check's state: a budget's until a day after its window ends."""
    return max(int(check.expire_at - now), 60) if check.expire_at else 0


class RedisStore:
    """The :class:`~tokenbooth.control.store.Store` in Redis. ``observe(operation, seconds,
    failed)`` is called after every command, for the latency and error metrics."""

    def __init__(self, url: str, *, timeout: float = 0.25, observe: Any = None) -> None:
        self.address = RedisAddress.parse(url)
        self.conn = RedisConnection(self.address, timeout)
        self._scripts = {name: _script(name) for name in ("admit", "settle", "seed")}
        self._sha: dict[str, str] = {}
        self._observe = observe

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        sha = self._sha.get(name)
        if sha is None:
            sha = self._sha[name] = (await self.conn.execute("SCRIPT", "LOAD", self._scripts[name])).decode()
        try:
            return await self.conn.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # a restarted or flushed Redis forgot the script: load it again
        self._sha[name] = (await self.conn.execute("SCRIPT", "LOAD", self._scripts[name])).decode()
        return await self.conn.execute("EVALSHA", self._sha[name], len(keys), *keys, *args)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        t0 = time.perf_counter()
        failed = True
        try:
            if name == "ping":
                result = await self.conn.execute("PING")
            else:
                result = await self._eval(name, keys, args)
            failed = False
            return result
        except (OSError, TimeoutError, ConnectionError, RedisReplyError) as exc:
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        finally:
            self._note(name, t0, failed)

    async def epoch(self) -> str:
        """Redis's epoch: a random value set once; a Redis that lost its data has a new one."""
        t0 = time.perf_counter()
        failed = True
        try:
            await self.conn.execute("SET", EPOCH_KEY, uuid.uuid4().hex, "NX")
            value = await self.conn.execute("GET", EPOCH_KEY)
            failed = False
            return str(value.decode() if value else "")
        except (OSError, TimeoutError, ConnectionError, RedisReplyError) as exc:
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        finally:
            self._note("epoch", t0, failed)

    async def ping(self) -> None:
        await self._run("ping", (), ())

    async def admit(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], now: float,
                    lease_until: float) -> Admission:
        args: list[Any] = [call_id, f"{now:.3f}", f"{lease_until:.3f}", int(lease_until - now) + 60]
        for c, amount in zip(checks, amounts, strict=True):
            param = (1 if c.hard else 0) if c.kind == "budget" else f"{c.per_second:.6f}"
            args += (_KIND[c.kind], c.limit, amount, param, _ttl(c, now))
        reply = await self._run("admit", _keys(call_id, checks), args)
        verdict = reply[0]
        if verdict == b"dup":
            return Admission()
        if verdict == b"seed":
            return Admission(need_seed=tuple(int(i) - 1 for i in reply[1]))
        used = tuple(float(v) for v in reply[2])
        spent = tuple(float(v) for v in reply[3])
        return Admission(refused=int(reply[1]) - 1 if verdict == b"refused" else None, used=used, spent=spent)

    @staticmethod
    def _settle_args(call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                     now: float) -> list[Any]:
        args: list[Any] = [call_id, f"{now:.3f}", SETTLED_TTL]
        for c, reserved, used in zip(checks, amounts, actual, strict=True):
            args += (_KIND[c.kind], c.limit, reserved, used, f"{c.per_second:.6f}")
        return args

    async def settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                     now: float) -> None:
        await self._run("settle", _keys(call_id, checks), self._settle_args(call_id, checks, amounts, actual, now))

    def send_settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                    now: float) -> asyncio.Future[Any]:
        """``settle`` without waiting for the answer: the command goes out now and the returned
        future ends with it (``StoreUnavailable`` on failure). No task is made when the
        connection is up and the script known, which is every call but the first."""
        args = self._settle_args(call_id, checks, amounts, actual, now)
        keys = _keys(call_id, checks)
        sha = self._sha.get("settle")
        if sha is None or not self.conn.ready():
            return asyncio.ensure_future(self._run("settle", keys, args))
        t0 = time.perf_counter()
        # held back a moment: at one call at a time it goes out with the next admission, in one write
        sent = self.conn.send("EVALSHA", sha, len(keys), *keys, *args, defer=SETTLE_DEFER)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def finished(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception() if not fut.cancelled() else ConnectionError("cancelled")
            if exc is None:
                self._note("settle", t0, False)
                done.set_result(fut.result())
            elif isinstance(exc, RedisReplyError) and str(exc).startswith("NOSCRIPT"):
                retry = asyncio.ensure_future(self._run("settle", keys, args))
                retry.add_done_callback(lambda r: done.set_exception(r.exception()) if r.exception()  # type: ignore[arg-type]
                                        else done.set_result(r.result()))
            else:
                self._note("settle", t0, True)
                done.set_exception(StoreUnavailable(f"{exc.__class__.__name__}: {exc}"))

        sent.add_done_callback(finished)
        return done

    def _note(self, name: str, t0: float, failed: bool) -> None:
        if self._observe is not None:
            self._observe(name, time.perf_counter() - t0, failed)

    async def seed(self, check: Check, spent: int) -> None:
        await self._run("seed", [check.key], [spent, _ttl(check, time.time())])

    async def close(self) -> None:
        await self.conn.close()
