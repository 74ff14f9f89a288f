"""Where budget, rate-limit and concurrency state lives: one interface, two implementations.

:class:`MemoryStore` (this module) holds it in process, for one gateway; ``RedisStore``
(``redis.py``, with its Lua scripts beside it) shares it between replicas. Both do the same:

- ``admit`` checks every check of a call at once and, only if all pass, reserves the call's
  amount against each. A budget refuses when ``spent + reserved + amount > limit`` (hard
  budgets only); a token bucket when it holds fewer tokens than the amount; a concurrency cap
  when it is full. Reservations carry a lease: a call never settled (its replica crashed)
  stops counting when the lease ends.
- ``settle`` replaces a call's reservations by what it really cost, once: settling the same
  call again changes nothing.
- a budget's state starts unseeded; ``admit`` then answers ``need_seed`` and the controller
  seeds it from the ledger (``seed`` keeps the larger of the ledger's and the store's spend,
  so a restart or a flush never counts a call twice).
- ``claim`` answers True once per name (for ``ttl`` seconds): a background response or a batch
  seen finished is charged by the first replica that claims it.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenbooth.control.policy import Check

CLAIMS_MAX = 100_000  # names a MemoryStore remembers claimed

__all__ = ["Admission", "MemoryStore", "Store", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The shared store did not answer in time (or at all)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What a store said about one call.

    ``refused`` is the index of the first check that refused, or None when admitted (or when
    some budgets need seeding first: ``need_seed``). ``used[i]`` is check i's state after the
    answer: for a budget, spent + reserved; for a bucket, the tokens left; for concurrency,
    the calls in flight. ``spent[i]`` is a budget's settled spend.
    """

    refused: int | None = None
    need_seed: tuple[int, ...] = ()
    used: tuple[float, ...] = ()
    spent: tuple[float, ...] = ()

    @property
    def admitted(self) -> bool:
        return self.refused is None and not self.need_seed


class Store(Protocol):
    """``amounts[i]`` is what a call reserves of ``checks[i]``; ``actual[i]`` what it really used."""

    async def admit(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], now: float,
                    lease_until: float) -> Admission: ...

    async def settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                     now: float) -> None: ...

    async def seed(self, check: Check, spent: int) -> None: ...

    async def claim(self, name: str, ttl: int) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class _Budget:
    period_key: str
    spent: int = 0
    reserved: int = 0
    seeded: bool = False
    leases: dict[str, tuple[int, float]] = field(default_factory=dict)  # call -> (amount, expiry)
    expiries: list[tuple[float, str]] = field(default_factory=list)  # heap over leases

    def purge(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            _, call = heapq.heappop(self.expiries)
            lease = self.leases.get(call)
            if lease is not None and lease[1] <= now:
                del self.leases[call]
                self.reserved -= lease[0]


@dataclass
class _Bucket:
    tokens: float
    at: float

    def refill(self, capacity: int, per_second: float, now: float) -> float:
        self.tokens = min(float(capacity), self.tokens + max(now - self.at, 0.0) * per_second)
        self.at = max(now, self.at)
        return self.tokens


def _state_key(check: Check) -> str:
    """Budgets are kept per scope and window kind, the period inside: a new period starts over."""
    return check.key.rsplit(":", 1)[0] if check.kind == "budget" else check.key


class MemoryStore:
    """In-process state for one gateway process. Not thread-safe: the event loop owns it."""

    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._inflight: dict[str, dict[str, float]] = {}  # key -> call -> lease expiry
        self._settled: set[str] = set()  # recently settled calls (idempotency), oldest first in _order
        self._order: deque[str] = deque()
        self._admitted: set[str] = set()
        self._claims: OrderedDict[str, float] = OrderedDict()  # name -> expiry (monotonic), oldest first

    def _budget(self, check: Check) -> _Budget:
        key = _state_key(check)
        state = self._budgets.get(key)
        if state is None or state.period_key != check.key:
            state = _Budget(check.key)
            self._budgets[key] = state
        return state

    def _bucket(self, check: Check, now: float) -> _Bucket:
        bucket = self._buckets.get(check.key)
        if bucket is None:
            bucket = self._buckets[check.key] = _Bucket(float(check.limit), now)
        bucket.refill(check.limit, check.per_second, now)
        return bucket

    def _calls(self, check: Check, now: float) -> dict[str, float]:
        calls = self._inflight.setdefault(check.key, {})
        if calls and min(calls.values()) <= now:
            for call in [c for c, expiry in calls.items() if expiry <= now]:
                del calls[call]
        return calls

    async def admit(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], now: float,
                    lease_until: float) -> Admission:
        states: list[Any] = []
        need = []
        refused = None
        for i, check in enumerate(checks):
            amount = amounts[i]
            state: Any
            if check.kind == "budget":
                state = self._budget(check)
                state.purge(now)
                if not state.seeded:
                    need.append(i)
                elif check.hard and refused is None and state.spent + state.reserved + amount > check.limit:
                    refused = i
            elif check.kind == "rate":
                state = self._bucket(check, now)
                if refused is None and state.tokens < amount:
                    refused = i
            else:
                state = self._calls(check, now)
                if refused is None and len(state) >= check.limit:
                    refused = i
            states.append(state)
        if need:
            return Admission(need_seed=tuple(need))
        if refused is None and call_id not in self._admitted:
            for check, amount, state in zip(checks, amounts, states, strict=True):
                if check.kind == "budget":
                    state.reserved += amount
                    state.leases[call_id] = (amount, lease_until)
                    heapq.heappush(state.expiries, (lease_until, call_id))
                elif check.kind == "rate":
                    state.tokens -= amount
                else:
                    state[call_id] = lease_until
            self._admitted.add(call_id)
        used = tuple(st.spent + st.reserved if c.kind == "budget" else st.tokens if c.kind == "rate" else len(st)
                     for c, st in zip(checks, states, strict=True))
        spent = tuple(st.spent if c.kind == "budget" else 0 for c, st in zip(checks, states, strict=True))
        return Admission(refused=refused, used=used, spent=spent)

    async def settle(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                     now: float) -> None:
        self.settle_now(call_id, checks, amounts, actual, now)

    def settle_now(self, call_id: str, checks: Sequence[Check], amounts: Sequence[int], actual: Sequence[int],
                   now: float) -> None:
        """``settle`` without a coroutine: in-process state needs no waiting."""
        if call_id in self._settled:
            return
        self._admitted.discard(call_id)
        self._settled.add(call_id)
        self._order.append(call_id)
        if len(self._order) > 10_000:  # idempotency needs only the recent past
            self._settled.discard(self._order.popleft())
        for check, reserved, used in zip(checks, amounts, actual, strict=True):
            if check.kind == "budget":
                state = self._budget(check)
                lease = state.leases.pop(call_id, None)
                if lease is not None:
                    state.reserved -= lease[0]
                    if len(state.expiries) > 2 * len(state.leases) + 64:  # settled leases linger in the heap
                        state.expiries = [(expiry, c) for c, (_, expiry) in state.leases.items()]
                        heapq.heapify(state.expiries)
                state.spent += used
            elif check.kind == "rate":
                if reserved != used:  # TPM: what was reserved, corrected to what was used
                    bucket = self._bucket(check, now)
                    bucket.tokens = min(float(check.limit), bucket.tokens + reserved - used)
            else:
                self._inflight.get(check.key, {}).pop(call_id, None)

    async def seed(self, check: Check, spent: int) -> None:
        state = self._budget(check)
        if not state.seeded:
            state.spent = max(state.spent, spent)
            state.seeded = True

    async def claim(self, name: str, ttl: int) -> bool:
        now = time.monotonic()
        claims = self._claims
        if claims.get(name, 0.0) > now:
            return False
        claims[name] = now + ttl
        claims.move_to_end(name)
        while len(claims) > CLAIMS_MAX or (claims and next(iter(claims.values())) <= now):
            claims.popitem(last=False)  # the oldest first: same ttl, so also the first to expire
        return True

    async def close(self) -> None:
        return None
