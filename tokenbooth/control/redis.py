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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenbooth.control.policy import Check
from tokenbooth.control.resp import RedisAddress, RedisConnection, RedisReplyError, bulk, pack
from tokenbooth.control.store import Admission, StoreUnavailable

__all__ = ["RedisStore"]

_LUA = Path(__file__).with_name("lua")
_KIND = {"budget": "b", "rate": "r", "concurrency": "c"}
EPOCH_KEY = "tb:epoch"
CLAIM_PREFIX = "tb:charged:"  # a background response or batch charged once, by whichever replica saw it done
SETTLED_TTL = 3600  # seconds a settled call's marker keeps a replayed settlement from counting twice
SETTLE_DEFER = 0.002  # seconds a settlement may wait to share a write with the next command


def _script(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def _ttl(check: Check, now: float) -> int:
    """Seconds Redis keeps a check's state: a budget's until a day after its window ends."""
    return max(int(check.expire_at - now), 60) if check.expire_at else 0


def _num(x: float, places: bytes = b"%.3f") -> bytes:
    return bulk(places % x)


class _Encoded:
    """What a call's admission and settlement scripts send that depends only on its checks,
    encoded in RESP once per plan, so a call encodes only its id, its time and its amounts."""

    __slots__ = ("admit_param", "checks", "heads", "keys", "kind_limit", "marker", "settle_param")

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = checks  # held, so the id() this is cached under is not reused
        self.marker = checks[0].key.split("}", 1)[0].encode() + b"}:call:"  # every check has its tenant's tag
        self.keys = b"".join(bulk(k.encode()) for c in checks for k in (c.key, c.key + ":leases"))
        self.kind_limit = tuple(bulk(_KIND[c.kind].encode()) + bulk(b"%d" % c.limit) for c in checks)
        self.admit_param = tuple(bulk(b"1" if c.hard else b"0") if c.kind == "budget"
                                 else _num(c.per_second, b"%.6f") for c in checks)
        self.settle_param = tuple(_num(c.per_second, b"%.6f") for c in checks)
        self.heads: dict[tuple[str, str], bytes] = {}

    def head(self, name: str, sha: str) -> bytes:
        """``*N EVALSHA sha numkeys``: what starts the command, for one script and its sha."""
        head = self.heads.get((name, sha))
        if head is None:
            n = len(self.checks)
            size = 3 + 1 + 2 * n + (4 if name == "admit" else 3) + 5 * n
            head = self.heads[(name, sha)] = (b"*%d\r\n" % size + bulk(b"EVALSHA") + bulk(sha.encode())
                                              + bulk(b"%d" % (1 + 2 * n)))
        return head

    def admit(self, sha: str, call_id: str, amounts: Sequence[int], now: float, lease_until: float) -> bytes:
        cid = call_id.encode()
        parts = [self.head("admit", sha), bulk(self.marker + cid), self.keys, bulk(cid), _num(now),
                 _num(lease_until), bulk(b"%d" % (int(lease_until - now) + 60))]
        for i, c in enumerate(self.checks):
            parts += (self.kind_limit[i], bulk(b"%d" % amounts[i]), self.admit_param[i], bulk(b"%d" % _ttl(c, now)))
        return b"".join(parts)

    def settle(self, sha: str, call_id: str, amounts: Sequence[int], actual: Sequence[int], now: float) -> bytes:
        cid = call_id.encode()
        parts = [self.head("settle", sha), bulk(self.marker + cid), self.keys, bulk(cid), _num(now), _SETTLED_TTL]
        for i in range(len(self.checks)):
            parts += (self.kind_limit[i], bulk(b"%d" % amounts[i]), bulk(b"%d" % actual[i]), self.settle_param[i])
        return b"".join(parts)


_SETTLED_TTL = bulk(b"%d" % SETTLED_TTL)


def _admission(reply: Any) -> Admission:
    """admit.lua's reply as an Admission."""
    verdict = reply[0]
    if verdict == b"dup":
        return Admission()
    if verdict == b"seed":
        return Admission(need_seed=tuple(int(i) - 1 for i in reply[1]))
    used = tuple(map(float, reply[2]))
    spent = tuple(map(float, reply[3]))
    return Admission(refused=int(reply[1]) - 1 if verdict == b"refused" else None, used=used, spent=spent)


class RedisStore:
    """The :class:`~tokenbooth.control.store.Store` in Redis. ``observe(operation, seconds,
    failed)`` is called after every command, for the latency and error metrics."""

    def __init__(self, url: str, *, timeout: float = 0.25, observe: Any = None) -> None:
        self.address = RedisAddress.parse(url)
        self.conn = RedisConnection(self.address, timeout)
        self._scripts = {name: _script(name) for name in ("admit", "settle", "seed")}
        self._sha: dict[str, str] = {}
        self._observe = observe
        self._encoded: dict[int, _Encoded] = {}

    def _encode(self, checks: Sequence[Check]) -> _Encoded:
        enc = self._encoded.get(id(checks))
        if enc is None or enc.checks is not checks:
            if len(self._encoded) > 10_000:
                self._encoded.clear()
            enc = self._encoded[id(checks)] = _Encoded(checks)
        return enc

    async def _load(self, name: str) -> str:
        sha: str = (await self.conn.execute("SCRIPT", "LOAD", self._scripts[name])).decode()
        self._sha[name] = sha
        return sha

    async def _eval(self, name: str, command: Callable[[str], bytes]) -> Any:
        """Run script ``name``: ``command(sha)`` is its EVALSHA, encoded."""
        sha = self._sha.get(name) or await self._load(name)
        try:
            return await self.conn.execute_packed(command(sha))
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # a restarted or flushed Redis forgot the script: load it again
        return await self.conn.execute_packed(command(await self._load(name)))

    async def _run(self, name: str, command: Callable[[str], bytes] | None) -> Any:
        t0 = time.perf_counter()
        failed = True
        try:
            result = await (self.conn.execute("PING") if command is None else self._eval(name, command))
            failed = False
            return result
        except (OSError, TimeoutError, ConnectionError, RedisReplyError) as exc:
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        finally:
            self._note(name, t0, failed)

    async def _commands(self, name: str, *commands: tuple[Any, ...]) -> Any:
        """Run plain commands in turn; the last one's reply."""
        t0 = time.perf_counter()
        failed = True
        try:
            for command in commands:
                reply = await self.conn.execute(*command)
            failed = False
            return reply
        except (OSError, TimeoutError, ConnectionError, RedisReplyError) as exc:
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        finally:
            self._note(name, t0, failed)

    async def epoch(self) -> str:
        """Redis's epoch: a random value set once; a Redis that lost its data has a new one."""
        value = await self._commands("epoch", ("SET", EPOCH_KEY, uuid.uuid4().hex, "NX"), ("GET", EPOCH_KEY))
        return str(value.decode() if value else "")

    async def claim(self, name: str, ttl: int) -> bool:
        """Whether this is the first claim of ``name`` on any replica (kept ``ttl`` seconds)."""
        return await self._commands("claim", ("SET", f"{CLAIM_PREFIX}{name}", "1", "NX", "EX", ttl)) is not None

    async def ping(self) -> None:
        await self._run("ping", None)

    async def admit(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], now: float,
                    lease_until: float) -> Admission:
        enc = self._encode(checks)
        return _admission(await self._run("admit", lambda sha: enc.admit(sha, call_id, amounts, now, lease_until)))

    def send_admit(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], now: float,
                   lease_until: float, done: Callable[[Admission | None, BaseException | None], None]) -> bool:
        """``admit`` without waiting for the answer, which goes to ``done(admission, None)``, or
        ``done(None, error)`` (a ``StoreUnavailable``, or the script's error). Returns False, having
        sent nothing, when the connection or the script is not ready."""
        sha = self._sha.get("admit")
        if sha is None or not self.conn.ready():
            return False
        t0 = time.perf_counter()

        def finished(reply: Any, exc: BaseException | None) -> None:
            self._note("admit", t0, exc is not None)
            if exc is None:
                done(_admission(reply), None)
                return
            if isinstance(exc, RedisReplyError):
                if str(exc).startswith("NOSCRIPT"):
                    self._sha.pop("admit", None)  # loaded again by the next admission that waits
                done(None, exc)
            else:
                done(None, StoreUnavailable(f"{exc.__class__.__name__}: {exc}"))

        self.conn.send(self._encode(checks).admit(sha, call_id, amounts, now, lease_until), finished)
        return True

    async def settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                     now: float) -> None:
        enc = self._encode(checks)
        await self._run("settle", lambda sha: enc.settle(sha, call_id, amounts, actual, now))

    def send_settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                    now: float, done: Callable[[BaseException | None], None]) -> None:
        """``settle`` without waiting for the answer: the command goes out now, and ``done`` is called
        with None once Redis took it, or with a ``StoreUnavailable`` (or the reply's error) if not.
        No future and no task is made when the connection is up and the script known, which is
        every call but the first."""
        sha = self._sha.get("settle")
        if sha is None or not self.conn.ready():
            self._settle_later(call_id, checks, amounts, actual, now, done)
            return
        t0 = time.perf_counter()

        def finished(_reply: Any, exc: BaseException | None) -> None:
            if exc is None:
                self._note("settle", t0, False)
                done(None)
            elif isinstance(exc, RedisReplyError) and str(exc).startswith("NOSCRIPT"):
                self._settle_later(call_id, checks, amounts, actual, now, done)
            else:
                self._note("settle", t0, True)
                done(StoreUnavailable(f"{exc.__class__.__name__}: {exc}"))

        # held back a moment: at one call at a time it goes out with the next admission, in one write
        command = self._encode(checks).settle(sha, call_id, amounts, actual, now)
        self.conn.send(command, finished, defer=SETTLE_DEFER)

    def _settle_later(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                      now: float, done: Callable[[BaseException | None], None]) -> None:
        """The slow way of ``send_settle``, in a task: connecting, or loading the script first."""
        task = asyncio.ensure_future(self.settle(call_id, checks, amounts, actual, now))
        task.add_done_callback(lambda t: done(t.exception() if not t.cancelled()
                                              else StoreUnavailable("the settlement was cancelled")))

    def _note(self, name: str, t0: float, failed: bool) -> None:
        if self._observe is not None:
            self._observe(name, time.perf_counter() - t0, failed)

    async def seed(self, check: Check, spent: int) -> None:
        ttl = _ttl(check, time.time())
        await self._run("seed", lambda sha: pack("EVALSHA", sha, 1, check.key, spent, ttl))

    async def close(self) -> None:
        await self.conn.close()
