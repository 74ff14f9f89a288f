"""The budget, rate-limit and concurrency stores: the same behaviour in process and in a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import RedisServer
from tokenbooth.config import BudgetConfig, LimitsConfig
from tokenbooth.control.policy import Check, budget_check, rate_checks, to_units
from tokenbooth.control.redis import RedisStore
from tokenbooth.control.store import MemoryStore, Store, StoreUnavailable

NOW = 1_796_000_000.0  # 2026-11-29, well inside a month
UTC = ZoneInfo("UTC")


def budget(limit: str, mode: str = "hard", window: str = "month", key_id: str | None = None) -> Check:
    return budget_check(BudgetConfig(window=window, limit=Decimal(limit), mode=mode),  # type: ignore[arg-type]
                        tenant="acme", key_id=key_id, now=NOW, zone=UTC)


def rate(**limits: int) -> list[Check]:
    return rate_checks(LimitsConfig(**limits), tenant="acme", key_id=None)


class Runner:
    """Runs a store's coroutines on one event loop (the RESP connection belongs to it)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        return lambda *a, **k: self.loop.run_until_complete(method(*a, **k))

    def admit(self, items: list[tuple[Check, int]], now: float = NOW, lease: float = 600,
              call: str | None = None) -> Any:
        """Admit a call reserving ``amount`` of each ``(check, amount)``; seeds budgets with 0 first."""
        self.calls += 1
        cid = call or f"c{self.calls}"
        checks, amounts = [c for c, _ in items], [a for _, a in items]
        seen = self.loop.run_until_complete(self.store.admit(cid, checks, amounts, now, now + lease))
        if seen.need_seed:
            for i in seen.need_seed:
                self.loop.run_until_complete(self.store.seed(checks[i], 0))
            seen = self.loop.run_until_complete(self.store.admit(cid, checks, amounts, now, now + lease))
        return cid, seen

    def settle(self, call: str, items: list[tuple[Check, int]], actual: list[int], now: float = NOW) -> None:
        self.loop.run_until_complete(self.store.settle(call, [c for c, _ in items], [a for _, a in items],
                                                       actual, now))


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Runner]:
    if request.param == "memory":
        runner = Runner(MemoryStore())
        yield runner
    else:
        server = RedisServer(tmp_path)
        server.start()
        runner = Runner(RedisStore(server.url, timeout=2))
        yield runner
        runner.close()
        server.stop()
    runner.loop.close()


def test_a_hard_budget_admits_until_the_next_call_could_pass_the_limit(store: Runner) -> None:
    b = budget("1")
    quarter = (b, to_units(Decimal("0.25")))
    results = [store.admit([quarter])[1] for _ in range(5)]
    assert [r.admitted for r in results] == [True, True, True, True, False]
    assert results[4].refused == 0
    assert results[4].used[0] == to_units(Decimal(1))  # four reservations of 0.25 held
    assert results[4].spent[0] == 0


def test_a_refused_call_reserves_nothing_anywhere(store: Runner) -> None:
    wide = (budget("10"), to_units(Decimal(1)))
    tight = (budget("1", window="day"), to_units(Decimal(2)))
    _, refused = store.admit([wide, tight])
    assert refused.refused == 1
    _, ok = store.admit([wide])
    assert ok.admitted and ok.used[0] == to_units(Decimal(1))  # only this call's reservation


def test_settlement_replaces_the_reservation_by_the_real_cost_once(store: Runner) -> None:
    b = (budget("1"), to_units(Decimal("0.6")))
    call, _ = store.admit([b])
    store.settle(call, [b], [to_units(Decimal("0.1"))], NOW + 1)
    store.settle(call, [b], [to_units(Decimal("0.1"))], NOW + 2)  # a replay counts nothing
    _, again = store.admit([b])
    assert again.admitted
    assert again.spent[0] == to_units(Decimal("0.1"))
    assert again.used[0] == to_units(Decimal("0.7"))


def test_a_soft_budget_counts_but_never_refuses(store: Runner) -> None:
    b = (budget("1", mode="soft"), to_units(Decimal(3)))
    call, seen = store.admit([b])
    assert seen.admitted
    store.settle(call, [b], [to_units(Decimal(3))], NOW)
    _, seen = store.admit([b])
    assert seen.admitted and seen.spent[0] == to_units(Decimal(3))


def test_a_lease_ends_a_crashed_callers_reservation(store: Runner) -> None:
    b = (budget("1"), to_units(Decimal("0.9")))
    store.admit([b], lease=30)  # never settled
    assert not store.admit([b], now=NOW + 10)[1].admitted
    assert store.admit([b], now=NOW + 31)[1].admitted


def test_seeding_keeps_the_larger_spend_and_happens_once(store: Runner) -> None:
    b = (budget("10"), 1)
    first = store.store.admit("x", [b[0]], [b[1]], NOW, NOW + 60)
    assert store.loop.run_until_complete(first).need_seed == (0,)
    store.settle("early", [(b[0], 0)], [to_units(Decimal(2))], NOW)  # settled before any seed
    store.seed(b[0], to_units(Decimal(3)))
    store.seed(b[0], to_units(Decimal(9)))  # a second seed changes nothing
    _, seen = store.admit([b])
    assert seen.spent[0] == to_units(Decimal(3))  # max(3 from the ledger, 2 seen here), never 5


def test_a_token_bucket_refuses_when_empty_and_refills_with_time(store: Runner) -> None:
    rpm = rate(rpm=3)[0]
    assert [store.admit([(rpm, 1)])[1].admitted for _ in range(4)] == [True, True, True, False]
    assert not store.admit([(rpm, 1)], now=NOW + 10)[1].admitted  # 0.5 request back after 10 s
    _, later = store.admit([(rpm, 1)], now=NOW + 20)  # one whole request refilled (3 per 60 s)
    assert later.admitted and later.used[0] == pytest.approx(0, abs=0.01)


def test_tpm_reserved_on_admission_is_corrected_at_settlement(store: Runner) -> None:
    tpm = rate(tpm=1000)[0]
    call, seen = store.admit([(tpm, 800)])
    assert seen.admitted and seen.used[0] == pytest.approx(200)
    assert not store.admit([(tpm, 300)])[1].admitted
    store.settle(call, [(tpm, 800)], [100], NOW)  # used far less than reserved
    _, seen = store.admit([(tpm, 300)])
    assert seen.admitted and seen.used[0] == pytest.approx(600)


def test_concurrency_counts_calls_in_flight(store: Runner) -> None:
    conc = rate(concurrency=2)[0]
    a, _ = store.admit([(conc, 1)])
    store.admit([(conc, 1)])
    assert store.admit([(conc, 1)])[1].refused == 0
    store.settle(a, [(conc, 1)], [1], NOW)
    assert store.admit([(conc, 1)])[1].admitted


def test_an_admission_sent_twice_reserves_once(store: Runner) -> None:
    b = (budget("1"), to_units(Decimal("0.6")))
    store.admit([b], call="same")
    store.admit([b], call="same")
    assert store.admit([(b[0], to_units(Decimal("0.4")))])[1].admitted


def test_a_new_period_starts_from_its_own_seed(store: Runner) -> None:
    day = (budget("1", window="day"), to_units(Decimal("0.8")))
    call, _ = store.admit([day])
    store.settle(call, [day], [to_units(Decimal("0.8"))], NOW)
    tomorrow = (budget_check(BudgetConfig(window="day", limit=Decimal(1)), tenant="acme", key_id=None,
                            now=NOW + 86400, zone=UTC), to_units(Decimal("0.8")))
    assert tomorrow[0].key != day[0].key
    assert store.admit([tomorrow], now=NOW + 86400)[1].admitted


def test_redis_that_hangs_or_is_gone_is_unavailable_quickly(redis_server: RedisServer) -> None:
    runner = Runner(RedisStore(redis_server.url, timeout=0.2))
    b = (budget("1"), 1)
    try:
        runner.admit([b])
        redis_server.pause()
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.2 s"):
            runner.admit([b])
        assert time.perf_counter() - t0 < 1
        redis_server.resume()
        assert runner.admit([b])[1].admitted  # a new connection once it answers again
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            runner.admit([b])
    finally:
        redis_server.resume() if redis_server.proc else None
        runner.close()
        runner.loop.close()


def test_a_settlement_sent_without_waiting_reports_its_end_either_way(redis_server: RedisServer) -> None:
    """send_settle's callback hears once that Redis took the settlement, or that it never answered."""
    runner = Runner(RedisStore(redis_server.url, timeout=0.2))
    b = (budget("1"), to_units(Decimal("0.5")))
    heard: list[BaseException | None] = []

    async def settle_and_wait(call: str) -> None:
        runner.store.send_settle(call, [b[0]], [b[1]], [to_units(Decimal("0.1"))], NOW,  # type: ignore[attr-defined]
                                 heard.append)
        deadline = time.perf_counter() + 2
        while len(heard) < len(calls) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    calls: list[str] = []
    try:
        for _ in range(2):  # the first goes the slow way (the script is not loaded yet), the second the fast
            calls.append(runner.admit([b])[0])
            runner.loop.run_until_complete(settle_and_wait(calls[-1]))
        assert heard == [None, None]
        call, seen = runner.admit([b])
        assert seen.admitted  # both settled at 0.1: 0.5 more fits in 1
        calls.append(call)
        redis_server.pause()
        t0 = time.perf_counter()
        runner.loop.run_until_complete(settle_and_wait(calls[-1]))
        assert time.perf_counter() - t0 < 1
        assert len(heard) == 3 and isinstance(heard[2], StoreUnavailable)
        assert "did not answer within 0.2 s" in str(heard[2])
    finally:
        redis_server.resume()
        runner.close()
        runner.loop.close()


def test_in_process_state_stays_small_however_many_calls_settle() -> None:
    runner = Runner(MemoryStore())
    b = (budget("100000"), 1)
    rpm = (rate(rpm=10**9)[0], 1)
    for _ in range(20_000):
        call, _ = runner.admit([b, rpm])
        runner.settle(call, [b, rpm], [1, 1])
    state = runner.store._budgets[b[0].key.rsplit(":", 1)[0]]  # type: ignore[attr-defined]
    assert len(state.leases) == 0 and len(state.expiries) <= 64 + 1
    assert len(runner.store._settled) <= 10_000 and not runner.store._admitted  # type: ignore[attr-defined]
    runner.loop.close()
