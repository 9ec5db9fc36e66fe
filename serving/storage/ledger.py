"""The token ledger: budget counters, open reservations and daily usage, written in batches.

Every operation is a row-level conditional statement, so the same code is correct on SQLite (one
writer at a time) and on PostgreSQL shared by several gateways: a reservation is admitted by
``UPDATE budget_counters SET reserved = reserved + n WHERE ... used + reserved + n <= limit``,
which PostgreSQL re-checks after waiting for a concurrent writer of the same row. Two requests at
the edge of a budget therefore never both get the last tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Table, and_, delete, insert, select
from sqlalchemy import update as sql_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from serving.storage.db import budget_counters, reservations, usage_daily

Counter = budget_counters.c
Usage = usage_daily.c


@dataclass(slots=True)
class Reserve:
    id: str
    client_id: str
    tokens: int
    day: str
    month: str
    day_limit: int | None
    month_limit: int | None
    expires_at: datetime


@dataclass(slots=True)
class Settle:
    reservation_id: str | None
    client_id: str
    model: str
    day: str
    month: str
    prompt_tokens: int
    completion_tokens: int
    charge: int  # tokens counted against budgets


Op = Reserve | Settle


@dataclass(frozen=True, slots=True)
class Counters:
    period: str
    used: int
    reserved: int


class LedgerRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    def _insert(self, table: Table):  # type: ignore[no-untyped-def]
        return (postgresql.insert(table) if self._dialect == "postgresql"
                else sqlite.insert(table))

    async def apply(self, ops: Sequence[Op]) -> list[str | None]:
        """Apply a batch in one transaction. For each op: None when done, or the period
        ("day" / "month") whose budget refused a reservation."""
        # One lock order for every batch (by client), so two gateways cannot deadlock.
        order = sorted(range(len(ops)), key=lambda i: ops[i].client_id)
        results: list[str | None] = [None] * len(ops)
        async with self._engine.begin() as conn:
            for i in order:
                op = ops[i]
                if isinstance(op, Reserve):
                    results[i] = await self._reserve(conn, op)
                else:
                    await self._settle(conn, op)
        return results

    async def _ensure(self, conn: AsyncConnection, client_id: str, period: str) -> None:
        await conn.execute(self._insert(budget_counters)
                           .values(client_id=client_id, period=period, used=0, reserved=0)
                           .on_conflict_do_nothing(index_elements=["client_id", "period"]))

    async def _hold(self, conn: AsyncConnection, client_id: str, period: str, tokens: int,
                    limit: int) -> bool:
        await self._ensure(conn, client_id, period)
        result = await conn.execute(
            sql_update(budget_counters)
            .where(Counter.client_id == client_id, Counter.period == period,
                   Counter.used + Counter.reserved + tokens <= limit)
            .values(reserved=Counter.reserved + tokens))
        return bool(result.rowcount)

    async def _add(self, conn: AsyncConnection, client_id: str, period: str, *,
                   used: int = 0, reserved: int = 0) -> None:
        stmt = self._insert(budget_counters).values(
            client_id=client_id, period=period, used=max(used, 0), reserved=max(reserved, 0))
        await conn.execute(stmt.on_conflict_do_update(
            index_elements=["client_id", "period"],
            set_={"used": Counter.used + used, "reserved": Counter.reserved + reserved}))

    async def _reserve(self, conn: AsyncConnection, op: Reserve) -> str | None:
        if op.day_limit is not None and not await self._hold(
                conn, op.client_id, op.day, op.tokens, op.day_limit):
            return "day"
        if op.month_limit is not None and not await self._hold(
                conn, op.client_id, op.month, op.tokens, op.month_limit):
            if op.day_limit is not None:
                await self._add(conn, op.client_id, op.day, reserved=-op.tokens)
            return "month"
        # Periods without a limit still hold the reservation, so counters stay comparable.
        if op.day_limit is None:
            await self._add(conn, op.client_id, op.day, reserved=op.tokens)
        if op.month_limit is None:
            await self._add(conn, op.client_id, op.month, reserved=op.tokens)
        await conn.execute(insert(reservations).values(
            id=op.id, client_id=op.client_id, day=op.day, month=op.month, tokens=op.tokens,
            created_at=datetime.now(UTC), expires_at=op.expires_at))
        return None

    async def _settle(self, conn: AsyncConnection, op: Settle) -> None:
        day, month = op.day, op.month
        held = 0
        if op.reservation_id is not None:
            row = (await conn.execute(
                delete(reservations).where(reservations.c.id == op.reservation_id)
                .returning(reservations.c.tokens))).first()
            held = row.tokens if row is not None else 0  # swept already: nothing held
        await self._add(conn, op.client_id, day, used=op.charge, reserved=-held)
        await self._add(conn, op.client_id, month, used=op.charge, reserved=-held)
        if not op.model:
            return  # a release with nothing to count (the request never reached an engine)
        stmt = self._insert(usage_daily).values(
            client_id=op.client_id, model=op.model, day=day, requests=1,
            prompt_tokens=op.prompt_tokens, completion_tokens=op.completion_tokens)
        await conn.execute(stmt.on_conflict_do_update(
            index_elements=["client_id", "model", "day"],
            set_={"requests": Usage.requests + 1,
                  "prompt_tokens": Usage.prompt_tokens + op.prompt_tokens,
                  "completion_tokens": Usage.completion_tokens + op.completion_tokens}))

    async def sweep(self, now: datetime) -> int:
        """Release reservations whose gateway never settled them (it died). Returns how many."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(
                delete(reservations).where(reservations.c.expires_at < now)
                .returning(reservations.c.client_id, reservations.c.day, reservations.c.month,
                           reservations.c.tokens))).all()
            for r in sorted(rows, key=lambda r: r.client_id):
                await self._add(conn, r.client_id, r.day, reserved=-r.tokens)
                await self._add(conn, r.client_id, r.month, reserved=-r.tokens)
        return len(rows)

    async def counters(self, client_id: str, periods: Sequence[str]) -> dict[str, Counters]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(budget_counters).where(
                Counter.client_id == client_id, Counter.period.in_(list(periods))))).all()
        return {r.period: Counters(r.period, r.used, r.reserved) for r in rows}

    async def open_reservations(self, client_id: str | None = None) -> int:
        query = select(reservations.c.tokens)
        if client_id is not None:
            query = query.where(reservations.c.client_id == client_id)
        async with self._engine.connect() as conn:
            return len((await conn.execute(query)).all())

    async def usage(self, client_id: str | None, day_from: str | None,
                    day_to: str | None) -> list[dict[str, object]]:
        conds = []
        if client_id is not None:
            conds.append(Usage.client_id == client_id)
        if day_from is not None:
            conds.append(Usage.day >= day_from)
        if day_to is not None:
            conds.append(Usage.day <= day_to)
        query = select(usage_daily).order_by(Usage.day, Usage.client_id, Usage.model)
        if conds:
            query = query.where(and_(*conds))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [{"client": r.client_id, "model": r.model, "day": r.day, "requests": r.requests,
                 "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                 "total_tokens": r.prompt_tokens + r.completion_tokens} for r in rows]
