"""The budget ledger on real SQLite and real PostgreSQL: reservations at the edge of a budget,
from concurrent requests and from two gateways at once, never overspend; settling, giving back
and sweeping leases keep the counters equal to what the rows say."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from serving.admission.budgets import BudgetLedger, QuotaExceeded
from serving.domain.policy import Budgets
from serving.storage import migrate
from serving.storage.db import create_engine, reservations
from serving.storage.ledger import LedgerRepository
from serving.storage.times import day_key, month_key

pytestmark = pytest.mark.anyio



@pytest.fixture
async def ledgers(db_url: str) -> AsyncIterator[list[BudgetLedger]]:
    """Two gateways' ledgers on one database, each with its own connection pool."""
    engines = [create_engine(db_url), create_engine(db_url)]
    await migrate.upgrade(engines[0])
    made = [BudgetLedger(LedgerRepository(e), reservation_ttl_s=900) for e in engines]
    for ledger in made:
        ledger.start()
    yield made
    for ledger in made:
        await ledger.stop()
    for e in engines:
        await e.dispose()


def periods() -> tuple[str, str]:
    now = datetime.now(UTC)
    return day_key(now), month_key(now)


async def leased(repo: LedgerRepository) -> int:
    async with repo._engine.connect() as conn:  # a test reads the rows
        return int((await conn.execute(
            select(func.coalesce(func.sum(reservations.c.tokens), 0)))).scalar() or 0)


async def test_concurrent_reservations_from_two_gateways_never_overspend(
        ledgers: list[BudgetLedger]) -> None:
    budget = Budgets(tokens_per_day=1000, tokens_per_month=5000)

    async def one(i: int) -> bool:
        try:
            await ledgers[i % 2].reserve("acme", budget, 70)
            return True
        except QuotaExceeded as exc:
            assert exc.period == "day" and exc.retry_after_s > 0
            return False

    admitted = await asyncio.gather(*(one(i) for i in range(50)))
    assert sum(admitted) == 1000 // 70  # 14: every admissible one, and not one more
    day, month = periods()
    counters = await ledgers[0].repo.counters("acme", [day, month])
    assert counters[day].reserved == counters[month].reserved == 14 * 70
    assert counters[day].used == 0
    assert await leased(ledgers[0].repo) == 14 * 70  # the leases hold exactly that


async def test_settling_charges_real_usage_and_frees_the_rest(
        ledgers: list[BudgetLedger]) -> None:
    budget = Budgets(tokens_per_day=300)
    ledger = ledgers[0]
    first = await ledger.reserve("acme", budget, 200)
    with pytest.raises(QuotaExceeded):
        await ledger.reserve("acme", budget, 200)
    ledger.settle(first, "acme", "demo-chat", prompt_tokens=30, completion_tokens=20, charge=50)
    second = await ledger.reserve("acme", budget, 200)  # 50 used + 200 held <= 300
    with pytest.raises(QuotaExceeded):
        await ledger.reserve("acme", budget, 60)  # 50 + 200 + 60 > 300
    ledger.settle(second, "acme", "demo-chat", 10, 5, 15)
    await ledger.flush()
    day, _ = periods()
    counters = await ledger.repo.counters("acme", [day])
    assert counters[day].used == 65
    assert counters[day].reserved == await leased(ledger.repo)  # what the lease still holds
    assert ledger.return_idle(force=True) == 1
    await ledger.flush()
    counters = await ledger.repo.counters("acme", [day])
    assert (counters[day].used, counters[day].reserved) == (65, 0)
    assert await ledger.repo.open_reservations() == 0
    usage = await ledger.repo.usage("acme", None, None)
    assert usage == [{"client": "acme", "model": "demo-chat", "day": day, "requests": 2,
                      "prompt_tokens": 40, "completion_tokens": 25, "total_tokens": 65}]


async def test_a_lease_serves_many_requests_with_one_write(ledgers: list[BudgetLedger]) -> None:
    ledger = ledgers[0]
    budget = Budgets(tokens_per_day=10**9)
    before = ledger.batches
    for _ in range(20):
        held = await ledger.reserve("acme", budget, 100)
        ledger.settle(held, "acme", "demo-chat", 50, 50, 100)
    assert ledger.batches - before <= 2  # one grant of 32 requests' worth, not 20 writes
    await ledger.stop()
    ledger.start()
    day, _ = periods()
    counters = await ledger.repo.counters("acme", [day])
    assert (counters[day].used, counters[day].reserved) == (2000, 0)


async def test_a_month_budget_refuses_and_gives_back_the_day_hold(
        ledgers: list[BudgetLedger]) -> None:
    ledger = ledgers[0]
    with pytest.raises(QuotaExceeded) as refused:
        await ledger.reserve("acme", Budgets(tokens_per_day=1000, tokens_per_month=100), 150)
    assert refused.value.period == "month"
    day, month = periods()
    counters = await ledger.repo.counters("acme", [day, month])
    assert counters[day].reserved == 0 and counters[month].reserved == 0


async def test_the_leases_of_a_dead_gateway_expire_and_are_released(db_url: str) -> None:
    engine = create_engine(db_url)
    await migrate.upgrade(engine)
    dead = BudgetLedger(LedgerRepository(engine), reservation_ttl_s=0.5)
    dead.start()
    await dead.reserve("acme", Budgets(tokens_per_day=100), 100)
    assert dead._writer is not None
    dead._writer.cancel()  # the gateway dies holding its lease
    live = BudgetLedger(LedgerRepository(engine), reservation_ttl_s=900)
    live.start()
    with pytest.raises(QuotaExceeded):
        await live.reserve("acme", Budgets(tokens_per_day=100), 100)
    await asyncio.sleep(0.6)
    assert await live.sweep() == 1
    held = await live.reserve("acme", Budgets(tokens_per_day=100), 100)
    # A lease swept while its gateway still used it: settling never frees tokens twice.
    await live.repo.sweep(datetime(2100, 1, 1, tzinfo=UTC))
    live.settle(held, "acme", "demo-chat", 5, 5, 10)
    await live.stop()
    day, _ = periods()
    counters = await live.repo.counters("acme", [day])
    assert (counters[day].used, counters[day].reserved) == (10, 0)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(reservations))).scalar() == 0
    await engine.dispose()


async def test_a_caller_that_leaves_while_waiting_does_not_leak_its_hold(
        ledgers: list[BudgetLedger]) -> None:
    ledger = ledgers[0]
    task = asyncio.ensure_future(ledger.reserve("acme", Budgets(tokens_per_day=100), 100))
    await asyncio.sleep(0)  # queued, not yet written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.stop()  # idle leases are given back
    ledger.start()
    day, _ = periods()
    counters = await ledger.repo.counters("acme", [day])
    assert counters[day].reserved == 0
    assert await ledger.repo.open_reservations("acme") == 0


async def test_every_settlement_is_written_within_moments_even_alone(
        ledgers: list[BudgetLedger]) -> None:
    """A lone settlement must not wait for the next request to be written (a timer that fires
    a little early once left it queued until shutdown)."""
    ledger = ledgers[0]
    day, _ = periods()
    for i in range(1, 16):
        held = await ledger.reserve("acme", Budgets(tokens_per_day=10**9), 10)
        ledger.settle(held, "acme", "demo-chat", 1, 0, 1)
        for _ in range(50):
            counters = await ledger.repo.counters("acme", [day])
            if counters[day].used == i:
                break
            await asyncio.sleep(0.01)
        assert counters[day].used == i, f"settlement {i} still queued after 0.5 s"
        await asyncio.sleep(0.03 * (i % 3))
