"""The gatekeeper: who is calling, and may this call go ahead?

The gateway asks :class:`Controller` three things and knows nothing of how they are answered:
``authenticate`` (the key in the request's headers), ``admit`` (reserve the call's worst case
against every budget and limit of its key and tenant, or refuse it), and ``settle`` (replace
the reservation by what the finished call's :class:`~tokenbooth.record.CallRecord` cost).
It knows no HTTP: refusals are :class:`~tokenbooth.errors.Refusal` errors, and rate-limit
state comes back as plain numbers on the :class:`Ticket`.

With Redis configured, state is shared through :class:`~tokenbooth.control.redis.RedisStore`.
When Redis fails or is slow, calls are admitted by an in-process :class:`MemoryStore` instead:
rate and concurrency limits then hold per replica, and each hard budget lends each replica at
most ``redis.outage_credit`` of its limit (never more than was left at the replica's last view
of Redis). Settlements Redis missed are replayed, idempotently, once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from tokenbooth.catalog import Metrics
from tokenbooth.config import Settings
from tokenbooth.control.keys import ClientKey, KeyRing, looks_like_key
from tokenbooth.control.policy import Check, budget_check, from_units, rate_checks, to_units
from tokenbooth.control.store import Admission, MemoryStore, Store, StoreUnavailable
from tokenbooth.errors import AuthError, BudgetExceeded, RateLimited
from tokenbooth.record import CallRecord, Cost

__all__ = ["Controller", "Demand", "Ticket"]

log = logging.getLogger("tokenbooth.control")

_GAUGE_EVERY = 1.0  # seconds between updates of one budget's gauges
# fast admission (redis.fast_admission): a call is admitted without waiting for Redis while this
# replica's view of each of its checks is at most FAST_VIEW_AGE seconds old and leaves room for
# FAST_ROOM_CALLS such calls and FAST_ROOM_SHARE of the limit
FAST_VIEW_AGE = 1.0
FAST_ROOM_CALLS = 1000
FAST_ROOM_SHARE = 0.1
CLAIM_TTL = 30 * 86_400  # seconds a charged background response or batch is remembered (OpenAI keeps them 30 days)
_REPLAY_MAX = 100_000  # settlements kept for Redis while it is away; the ledger has them all in any case
# a settlement Redis has not taken yet: call id, checks, reserved amounts, actual amounts, when
_Replay = tuple[str, tuple[Check, ...], tuple[int, ...], tuple[int, ...], float]


@dataclass(frozen=True, slots=True)
class Demand:
    """A call's worst case: input tokens as counted locally plus the output it may generate, and
    what that would cost (None: no price is known, so budgets cannot be charged for it)."""

    tokens: int
    cost: Cost | None


@dataclass(frozen=True, slots=True)
class RateState:
    """One rate limit after admission, for the client's ``x-ratelimit-*`` headers."""

    name: str  # "rpm" or "tpm"
    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


@dataclass(slots=True)
class Ticket:
    """An admitted call: what it reserved, where, and the tightest rate limits for its headers."""

    call_id: str
    checks: tuple[Check, ...]
    amounts: tuple[int, ...]  # what the call reserved of each check
    local: bool = False  # admitted by the in-process store while Redis was away
    rates: tuple[RateState, ...] = ()


def _in_currency(cost: Cost, currency: str, fx: Mapping[str, Decimal]) -> Decimal:
    return cost.amount if cost.currency == currency else cost.usd / fx[currency]


def _when(reset: dt.datetime | None) -> str:
    return "never resets" if reset is None else f"resets {reset.isoformat(timespec='seconds')}Z"


class Controller:
    """Authentication, admission and settlement for the gateway (see the module's docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics, *, ring: KeyRing | None, store: Store,
                 shared: bool, spend: Callable[[Check], Decimal] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = settings.auth_mode
        self.ring = ring
        self.store = store
        self.shared = shared  # store is Redis: fall back to self.local when it fails
        self.local = store if isinstance(store, MemoryStore) and not shared else MemoryStore()
        self.spend = spend
        self.clock = clock
        self.metrics = metrics
        self.fx = settings.pricing.fx
        self.zone = ZoneInfo(settings.budgets.timezone)
        self.tenants = settings.tenants
        self.default_max_tokens = settings.budgets.default_max_tokens
        longest = max((u.timeout.total for u in settings.upstreams), default=600.0)
        self.lease = settings.budgets.lease or longest + 60
        self.credit = Decimal(str(settings.redis.outage_credit))
        self.retry_interval = settings.redis.retry_interval
        self._plans: dict[str, tuple[float, tuple[Check, ...]]] = {}
        self._seq = 0
        self._prefix = f"{int(time.time() * 1000) % 10**10:x}{id(self) % 4096:03x}"
        self._down_until = 0.0
        self._down = False
        self._last_used: dict[str, float] = {}  # budget key -> spent + reserved at the last answer of Redis
        self._replay: deque[_Replay] = deque(maxlen=_REPLAY_MAX)
        self._recovering = False
        self._epoch: str | None = None  # Redis's epoch key: it changes when Redis loses its data
        self._pending = 0  # settlements sent to Redis, not yet answered
        self._gauges: dict[tuple[str, str], tuple[Any, Any, Any]] = {}  # spent, limit, ratio
        self._latest: dict[tuple[str, str], tuple[Check, float]] = {}  # not in the gauges yet
        self._gauge_timer: asyncio.TimerHandle | None = None
        self.fast = shared and settings.redis.fast_admission
        self._views: dict[str, tuple[float, float]] = {}  # check key -> (monotonic time, room left) seen in Redis
        self._overshoot_logged = 0.0
        self._redis_up = metrics.redis_up
        if shared:
            self._redis_up.set(1)

    # -- who --------------------------------------------------------------------------------
    def authenticate(self, headers: Mapping[bytes, bytes]) -> ClientKey | None:
        """The caller's key in keys mode (``Authorization: Bearer tb-…`` or ``x-api-key: tb-…``);
        None in open mode. Raises :class:`AuthError`, naming no part of what was sent."""
        if self.mode == "open" or self.ring is None:
            return None
        secret = None
        auth = headers.get(b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            secret = auth[7:].strip().decode("latin-1")
        if secret is None or not looks_like_key(secret):
            api_key = headers.get(b"x-api-key")
            secret = api_key.strip().decode("latin-1") if api_key is not None else secret
        if not secret:
            raise AuthError("You didn't provide an API key. This gateway needs a tokenbooth key (tb-...) in the "
                            "Authorization header (Bearer) or in x-api-key.")
        key = self.ring.resolve(secret) if looks_like_key(secret) else None
        if key is None:
            raise AuthError("Incorrect API key provided: the key is unknown, revoked or expired. "
                            "Ask your gateway's operator for a tokenbooth key (tb-...).")
        return key

    # -- what applies -----------------------------------------------------------------------
    def plan(self, key: ClientKey | None) -> tuple[Check, ...]:
        """The checks of a key's calls: its tenant's budgets and limits, then its own."""
        if key is None:
            return ()
        now = self.clock()
        cached = self._plans.get(key.id)
        if cached is not None and cached[0] > now:
            return cached[1]
        unknown = sorted({b.currency for b in key.budgets if b.currency not in self.fx})
        if unknown:  # never admit what cannot be charged: the key is refused until pricing.fx has the rate
            raise BudgetExceeded(f"Key {key.id} has a budget in {', '.join(unknown)}, which this gateway cannot "
                                 f"convert to: its operator must configure pricing.fx.{unknown[0]}.")
        tenant = self.tenants.get(key.tenant)
        checks: list[Check] = []
        if tenant is not None:
            checks += [budget_check(b, tenant=key.tenant, key_id=None, now=now, zone=self.zone) for b in tenant.budgets]
        checks += [budget_check(b, tenant=key.tenant, key_id=key.id, now=now, zone=self.zone) for b in key.budgets]
        if tenant is not None:
            checks += rate_checks(tenant.limits, tenant=key.tenant, key_id=None)
        checks += rate_checks(key.limits, tenant=key.tenant, key_id=key.id)
        resets = [c.window.reset.replace(tzinfo=dt.UTC).timestamp() for c in checks if c.window and c.window.reset]
        valid = min([now + 60, *resets])
        if len(self._plans) > 10_000:
            self._plans.clear()
        self._plans[key.id] = (valid, tuple(checks))
        return tuple(checks)

    @staticmethod
    def needs_demand(checks: Sequence[Check]) -> bool:
        """Whether admission needs the call's estimated tokens and cost (a budget or a TPM limit)."""
        return any(c.kind == "budget" or c.name == "tpm" for c in checks)

    # -- admission --------------------------------------------------------------------------
    async def admit(self, checks: tuple[Check, ...], demand: Demand | None) -> Ticket | None:
        """Reserve the call's worst case against every check, or raise the refusal."""
        if not checks:
            return None
        self._seq += 1
        call_id = f"{self._prefix}{self._seq:x}"
        amounts = self._amounts(checks, demand)
        now = self.clock()
        lease_until = now + self.lease
        local = False
        if self.fast and not self._down:
            rates = self._fast(checks, amounts)
            if rates is not None:
                ticket = Ticket(call_id, checks, amounts, False, rates)
                if self.store.send_admit(call_id, checks, amounts, now, lease_until,  # type: ignore[attr-defined]
                                         lambda admission, exc: self._admitted(ticket, admission, exc)):
                    return ticket
        if self.shared:
            try:
                admission = await self._admit_shared(call_id, checks, amounts, now, lease_until)
            except StoreUnavailable:
                local = True
                checks = self._outage_view(checks)
                admission = await self._admit_seeded(self.local, call_id, checks, amounts, now, lease_until,
                                                     outage=True)
        else:
            admission = await self._admit_seeded(self.store, call_id, checks, amounts, now, lease_until)
        self._observe_budgets(checks, admission)
        if admission.refused is not None:
            raise self._refusal(checks, amounts, admission, admission.refused)
        return Ticket(call_id, checks, amounts, local, self._rates(checks, admission))

    def _amounts(self, checks: tuple[Check, ...], demand: Demand | None) -> tuple[int, ...]:
        """What the call reserves of each check: its worst-case cost in each budget's currency,
        its worst-case tokens for TPM, one call for RPM and concurrency."""
        out = []
        by_currency: dict[str, int] = {}
        for check in checks:
            if check.kind == "budget":
                cost = demand.cost if demand is not None else None
                amount = by_currency.get(check.currency)
                if amount is None:
                    amount = to_units(_in_currency(cost, check.currency, self.fx), up=True) if cost else 0
                    by_currency[check.currency] = amount
                out.append(amount)
            elif check.name == "tpm":
                tokens = demand.tokens if demand is not None else 0
                if tokens > check.limit:
                    raise RateLimited(f"Request too large for {check.scope}: it may use up to {tokens} tokens "
                                      f"(input and max output), above the limit of {check.limit} tokens per "
                                      "minute. Send less, or lower max_tokens.", 60, tokens=True)
                out.append(tokens)
            else:
                out.append(1)
        return tuple(out)

    async def _admit_shared(self, call_id: str, checks: tuple[Check, ...], amounts: tuple[int, ...], now: float,
                            lease_until: float) -> Admission:
        if self._down and (now < self._down_until or self._recovering):
            raise StoreUnavailable("Redis is away")  # not tried again before retry_interval
        try:
            if self._down:
                await self._recover()
            elif self._epoch is None:
                self._epoch = await self.store.epoch()  # type: ignore[attr-defined]
            admission = await self._admit_seeded(self.store, call_id, checks, amounts, now, lease_until)
        except StoreUnavailable as exc:
            self._went_down(exc, now)
            raise
        self._saw(checks, amounts, admission)
        return admission

    def _saw(self, checks: tuple[Check, ...], amounts: tuple[int, ...], admission: Admission) -> None:
        """Keep what Redis answered an admission: each budget's spent and reserved before the
        call (what an outage may lend from), and each check's room (for fast admission)."""
        for i, c in enumerate(checks):
            if c.kind == "budget" and admission.used:
                self._last_used[c.key] = admission.used[i] - (amounts[i] if admission.refused is None else 0)
        self._view(checks, admission)

    # -- fast admission ---------------------------------------------------------------------
    def _fast(self, checks: tuple[Check, ...], amounts: tuple[int, ...]) -> tuple[RateState, ...] | None:
        """The call's rate states if it may be admitted without waiting for Redis (see
        FAST_VIEW_AGE), its amounts then taken from this replica's view; else None."""
        t = time.monotonic()
        views = self._views
        for c, amount in zip(checks, amounts, strict=True):
            if c.kind == "budget" and not c.hard:
                continue
            view = views.get(c.key)
            if c.kind == "concurrency" or view is None or t - view[0] > FAST_VIEW_AGE or \
                    view[1] - amount < max(FAST_ROOM_CALLS * amount, FAST_ROOM_SHARE * c.limit):
                return None
        left = []
        for c, amount in zip(checks, amounts, strict=True):
            view = views.get(c.key)
            room = view[1] - amount if view is not None else 0.0
            if view is not None:
                views[c.key] = (view[0], room)
            left.append(room)  # for a bucket, the tokens it has left: what Redis answers as "used"
        return self._rates(checks, Admission(used=tuple(left)))

    def _view(self, checks: tuple[Check, ...], admission: Admission) -> None:
        """Remember the room Redis said each check has left, for fast admission."""
        if not self.fast:
            return
        if not admission.admitted or not admission.used:
            for c in checks:
                self._views.pop(c.key, None)
            return
        t = time.monotonic()
        if len(self._views) > 10_000:
            self._views.clear()
        for c, used in zip(checks, admission.used, strict=True):
            if c.kind == "budget":
                self._views[c.key] = (t, c.limit - used)
            elif c.kind == "rate":
                self._views[c.key] = (t, used)  # a bucket's "used" is the tokens it has left

    def _admitted(self, ticket: Ticket, admission: Admission | None, exc: BaseException | None) -> None:
        """Redis's answer to an admission sent without waiting. Refused (other replicas spent the
        room within a second) or not reserved, the call is already on its way: its rate
        reservations are dropped, so settlement counts what it used, and it is logged."""
        checks = ticket.checks
        if admission is not None and admission.admitted:
            self._saw(checks, ticket.amounts, admission)
            self._observe_budgets(checks, admission)
            return
        for c in checks:
            self._views.pop(c.key, None)
        if isinstance(exc, StoreUnavailable):
            self._went_down(exc, self.clock())
            ticket.local = True  # settled in process, and replayed to Redis when it is back
            return
        ticket.amounts = tuple(0 if c.kind == "rate" else a for c, a in zip(checks, ticket.amounts, strict=True))
        if admission is not None and admission.refused is not None:
            self.metrics.fast_overshoot.inc()
            now = time.monotonic()
            if now - self._overshoot_logged > 60:
                self._overshoot_logged = now
                log.warning("a call admitted without waiting for Redis went past %s's limit: other replicas "
                            "used the room this one saw within the last second (counted in "
                            "tokenbooth_admission_overshoot_total)", checks[admission.refused].scope)
        elif exc is not None:
            log.error("an admission sent to Redis failed: %s", exc)

    async def _recover(self) -> None:
        """Redis answers again: hand it the settlements it missed, then share state again.

        A Redis that came back empty (restarted without persistence, or flushed: its epoch key
        changed) gets none of them: its budgets are seeded again from the ledger, which holds
        those calls, and replaying them on top would count them twice.
        """
        self._recovering = True
        try:
            epoch = await self.store.epoch()  # type: ignore[attr-defined]
            if epoch != self._epoch and self._epoch is not None:
                log.warning("Redis came back empty: %d settlements are not replayed; budgets are seeded again "
                            "from the ledger", len(self._replay))
                self._replay.clear()
            while self._replay:
                call_id, checks, amounts, actual, when = self._replay[0]
                await self.store.settle(call_id, checks, amounts, actual, when)
                self._replay.popleft()
            self._epoch = epoch
        finally:
            self._recovering = False
        self._down = False
        self._redis_up.set(1)
        log.warning("Redis answers again: budgets and limits are shared again")

    async def _admit_seeded(self, store: Store, call_id: str, checks: tuple[Check, ...], amounts: tuple[int, ...],
                            now: float, lease_until: float, *, outage: bool = False) -> Admission:
        for _ in range(3):
            admission = await store.admit(call_id, checks, amounts, now, lease_until)
            if not admission.need_seed:
                return admission
            for i in admission.need_seed:
                await store.seed(checks[i], 0 if outage else await self._ledger_spend(checks[i]))
        raise StoreUnavailable("budget state could not be seeded")

    async def _ledger_spend(self, check: Check) -> int:
        if self.spend is None:
            return 0
        try:
            amount = await asyncio.to_thread(self.spend, check)
        except Exception as exc:  # the ledger is away: start from zero rather than refuse everything
            log.warning("could not read %s's spend from the ledger (%s); counting from 0 for now",
                        check.scope, exc.__class__.__name__)
            return 0
        return to_units(amount)

    async def claim(self, name: str, ttl: int = CLAIM_TTL) -> bool:
        """Whether this replica is the first to claim ``name``: a background response or a batch
        seen finished, which is charged once. Asked of Redis when it is shared and answers;
        else of this process's memory (two replicas may then each charge it once)."""
        if self.shared and not self._down:
            try:
                return await self.store.claim(name, ttl)
            except StoreUnavailable as exc:
                self._went_down(exc, self.clock())
        return await self.local.claim(name, ttl)

    def _outage_view(self, checks: tuple[Check, ...]) -> tuple[Check, ...]:
        """Checks for the in-process store while Redis is away: each hard budget lends this
        replica at most ``outage_credit`` of its limit, and no more than was left."""
        out = []
        for c in checks:
            if c.kind == "budget":
                left = c.limit - self._last_used.get(c.key, 0)
                out.append(replace(c, limit=max(0, min(int(left), int(c.limit * self.credit)))))
            else:
                out.append(c)
        return tuple(out)

    def _went_down(self, exc: StoreUnavailable, now: float) -> None:
        self._down_until = now + self.retry_interval
        if not self._down:
            self._down = True
            self._redis_up.set(0)
            log.error("Redis is unreachable (%s): budgets and limits are enforced in process, each hard budget "
                      "lending this replica at most %s of its limit, until it answers again", exc, self.credit)

    def _refusal(self, checks: tuple[Check, ...], amounts: tuple[int, ...], admission: Admission,
                 index: int) -> Exception:
        c = checks[index]
        amount = amounts[index]
        used = admission.used[index] if admission.used else 0
        if c.kind == "budget":
            spent = admission.spent[index] if admission.spent else 0
            assert c.window is not None
            return BudgetExceeded(
                f"Budget exceeded for {c.scope}: {c.window.kind} {c.window.period} limit {_money(c.limit)} "
                f"{c.currency}, spent {_money(spent)}, reserved by calls in flight {_money(used - spent)}, "
                f"this call may cost up to {_money(amount)}; {_when(c.window.reset)}.")
        if c.kind == "rate":
            wait = (amount - used) / c.per_second if c.per_second else 60
            what = "requests" if c.name == "rpm" else "tokens"
            return RateLimited(f"Rate limit reached for {c.scope} on {what} per min ({c.name.upper()}): limit "
                               f"{c.limit}, remaining {max(int(used), 0)}, requested {amount}. Please try "
                               f"again in {wait:.1f}s.", wait, tokens=c.name == "tpm")
        return RateLimited(f"Too many calls in flight for {c.scope}: the limit is {c.limit} at once. Please try "
                           "again when one has finished.", 1, concurrency=True)

    @staticmethod
    def _rates(checks: tuple[Check, ...], admission: Admission) -> tuple[RateState, ...]:
        best: dict[str, RateState] = {}
        for i, c in enumerate(checks):
            if c.kind != "rate" or not admission.used:
                continue
            left = admission.used[i]
            state = RateState(c.name, c.limit, max(int(left), 0), max(c.limit - left, 0) / c.per_second)
            held = best.get(c.name)
            if held is None or state.remaining / state.limit < held.remaining / held.limit:
                best[c.name] = state
        return tuple(best.values())

    def _observe_budgets(self, checks: tuple[Check, ...], admission: Admission) -> None:
        """Budget gauges from what an admission saw. They are set at once, then at most every
        ``_GAUGE_EVERY`` seconds with the latest values (Prometheus reads them far less often);
        a refusal sets them at once."""
        if not admission.spent:
            return
        for i, c in enumerate(checks):
            if c.kind == "budget" and c.key_id is None:  # keys never become labels; tenants are the configured ones
                self._latest[(c.tenant, c.name)] = (c, admission.spent[i])
        if admission.refused is not None:
            self._set_gauges()  # what the refusal saw, at once
        elif self._gauge_timer is None:
            self._set_gauges()
            self._gauge_timer = asyncio.get_running_loop().call_later(_GAUGE_EVERY, self._set_gauges, True)

    def _set_gauges(self, timer: bool = False) -> None:
        if timer:
            self._gauge_timer = None
        for (tenant, window), (c, spent) in self._latest.items():
            gauges = self._gauges.get((tenant, window))
            if gauges is None:
                m = self.metrics
                gauges = (m.budget_spent_usd.labels(tenant, window), m.budget_limit_usd.labels(tenant, window),
                          m.budget_used_ratio.labels(tenant, window))
                self._gauges[(tenant, window)] = gauges
            rate = float(self.fx[c.currency])
            gauges[0].set(spent / 1e9 * rate)
            gauges[1].set(c.limit / 1e9 * rate)
            gauges[2].set(spent / c.limit if c.limit else 0.0)
        self._latest.clear()

    # -- settlement -------------------------------------------------------------------------
    def settle(self, ticket: Ticket | None, record: CallRecord) -> None:
        """Replace the call's reservations by what its record says it cost. Never raises."""
        if ticket is None:
            return
        actual = self._actual(ticket, record)
        now = self.clock()
        call_id, checks, amounts = ticket.call_id, ticket.checks, ticket.amounts
        if not self.shared or ticket.local:
            self.local.settle_now(call_id, checks, amounts, actual, now)
            if ticket.local:
                # Redis never reserved this call: tell it what was spent (TPM tokens included)
                redis_amounts = tuple(0 if c.name == "tpm" else a for c, a in zip(checks, amounts, strict=True))
                self._replay.append((call_id, checks, redis_amounts, actual, now))
            return
        if self._down:
            self._replay.append((call_id, checks, amounts, actual, now))
            return
        entry = (call_id, checks, amounts, actual, now)
        self._pending += 1
        self.store.send_settle(call_id, checks, amounts, actual, now,  # type: ignore[attr-defined]
                               lambda exc: self._settled(exc, entry))

    def _settled(self, exc: BaseException | None, entry: _Replay) -> None:
        self._pending -= 1
        if exc is not None:
            self._replay.append(entry)
            if isinstance(exc, StoreUnavailable):
                self._went_down(exc, self.clock())
            else:
                log.error("settlement of call %s failed: %s", entry[0], exc)

    def _actual(self, ticket: Ticket, record: CallRecord) -> tuple[int, ...]:
        out = []
        cost = record.cost
        for check, reserved in zip(ticket.checks, ticket.amounts, strict=True):
            if check.kind == "budget":
                out.append(to_units(_in_currency(cost, check.currency, self.fx)) if cost is not None else 0)
            elif check.name == "tpm":
                out.append(record.usage.input + record.usage.output)
            else:
                out.append(reserved)
        return tuple(out)

    async def close(self) -> None:
        """Let settlements in progress finish, replay what Redis missed, and close."""
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
            self._set_gauges(True)
        deadline = time.monotonic() + 5
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.shared and self._replay:
            with contextlib.suppress(StoreUnavailable):
                await self._recover()
            if self._replay:
                log.error("%d settlements could not reach Redis before shutdown; the ledger holds their "
                          "calls, so a Redis flush and reseed would count them", len(self._replay))
        if self.ring is not None:
            await asyncio.to_thread(self.ring.close)
        await self.store.close()


def _money(units: float) -> str:
    return f"{from_units(round(units)):.6f}".rstrip("0").rstrip(".") if units else "0"
