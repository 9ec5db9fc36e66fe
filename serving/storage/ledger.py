"""The token ledger: budget counters, gateways' budget leases, and daily usage.

A gateway does not write the ledger for every request. It holds a **lease** per client and
period: tokens reserved in the counters (``reserved``) and recorded as a row of
``reservations`` with an expiry the live gateway keeps renewing. Requests reserve against the
lease in memory; their settlements move tokens from the lease to ``used``, in batches.
Operations come in batches (one transaction each) and cost a handful of statements per batch.
A grant is decided against counters read under a row lock (``FOR UPDATE`` on PostgreSQL; SQLite
has one writer, and a stale read fails the commit and the batch is retried), so the same code is
correct on SQLite and on PostgreSQL shared by several gateways: ``used + reserved`` never goes
past a budget, whatever the number of gateways and concurrent requests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Table, and_, bindparam, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from serving.storage.db import budget_counters, dialect_insert, reservations, usage_daily

Counter = budget_counters.c
Usage = usage_daily.c
Lease = reservations.c


@dataclass(slots=True)
class Grant:
    """Add ``tokens`` to a lease if both periods' budgets allow it."""

    lease_id: str
    client_id: str
    day: str
    month: str
    tokens: int
    day_limit: int | None
    month_limit: int | None
    expires_at: datetime


@dataclass(slots=True)
class Charge:
    """A finished request: ``charge`` tokens move from its lease (if any) to ``used``."""

    lease_id: str | None
    client_id: str
    model: str
    day: str
    month: str
    prompt_tokens: int
    completion_tokens: int
    charge: int


@dataclass(slots=True)
class Return:
    """Give a lease back: whatever it still holds is released."""

    lease_id: str


@dataclass(slots=True)
class Renew:
    lease_id: str
    expires_at: datetime


Op = Grant | Charge | Return | Renew


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
        return dialect_insert(self._engine, table)

    async def apply(self, ops: Sequence[Op]) -> list[str | None]:
        """Apply a batch in one transaction. For each op: None when done, or for a refused
        grant the period ("day" / "month") whose budget refused it."""
        results: list[str | None] = [None] * len(ops)
        deltas: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # used, reserved
        usage: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        charges = [op for op in ops if isinstance(op, Charge)]
        returns = [op.lease_id for op in ops if isinstance(op, Return)]
        renews = [op for op in ops if isinstance(op, Renew)]
        grants = [(i, op) for i, op in enumerate(ops) if isinstance(op, Grant)]
        async with self._engine.begin() as conn:
            if charges:
                await self._charge(conn, charges, deltas, usage)
            if returns:
                rows = (await conn.execute(
                    delete(reservations).where(Lease.id.in_(returns))
                    .returning(Lease.client_id, Lease.day, Lease.month, Lease.tokens))).all()
                for r in rows:
                    deltas[(r.client_id, r.day)][1] -= r.tokens
                    deltas[(r.client_id, r.month)][1] -= r.tokens
            if renews:
                await conn.execute(
                    update(reservations).where(Lease.id == bindparam("lid"))
                    .values(expires_at=bindparam("exp")),
                    [{"lid": op.lease_id, "exp": op.expires_at} for op in renews])
            if grants:
                await self._grant(conn, grants, deltas, results)
            await self._add(conn, deltas)
            if usage:
                stmt = self._insert(usage_daily)
                await conn.execute(stmt.on_conflict_do_update(
                    index_elements=["client_id", "model", "day"],
                    set_={"requests": Usage.requests + stmt.excluded.requests,
                          "prompt_tokens": Usage.prompt_tokens + stmt.excluded.prompt_tokens,
                          "completion_tokens": Usage.completion_tokens
                          + stmt.excluded.completion_tokens}),
                    [{"client_id": c, "model": m, "day": day, "requests": u[0],
                      "prompt_tokens": u[1], "completion_tokens": u[2]}
                     for (c, m, day), u in sorted(usage.items())])
        return results

    async def _charge(self, conn: AsyncConnection, charges: list[Charge],
                      deltas: dict[tuple[str, str], list[int]],
                      usage: dict[tuple[str, str, str], list[int]]) -> None:
        lease_ids = sorted({op.lease_id for op in charges if op.lease_id is not None})
        live: set[str] = set()
        if lease_ids:
            live = set((await conn.execute(
                select(Lease.id).where(Lease.id.in_(lease_ids)))).scalars())
        taken: dict[str, int] = defaultdict(int)
        for op in charges:
            # From a lease that still exists; a swept lease's tokens were released already.
            from_lease = op.lease_id is not None and op.lease_id in live
            for period in (op.day, op.month):
                d = deltas[(op.client_id, period)]
                d[0] += op.charge
                if from_lease:
                    d[1] -= op.charge
            if from_lease:
                assert op.lease_id is not None
                taken[op.lease_id] += op.charge
            if op.model:
                u = usage[(op.client_id, op.model, op.day)]
                u[0] += 1
                u[1] += op.prompt_tokens
                u[2] += op.completion_tokens
        if taken:
            await conn.execute(
                update(reservations).where(Lease.id == bindparam("lid"))
                .values(tokens=Lease.tokens - bindparam("n")),
                [{"lid": lid, "n": n} for lid, n in sorted(taken.items())])

    async def _grant(self, conn: AsyncConnection, grants: list[tuple[int, Grant]],
                     deltas: dict[tuple[str, str], list[int]],
                     results: list[str | None]) -> None:
        current = await self._locked_counters(
            conn, {(op.client_id, p) for _, op in grants for p in (op.day, op.month)})
        admitted: dict[str, Grant] = {}
        for i, op in grants:
            refused = None
            for kind, period, limit in (("day", op.day, op.day_limit),
                                        ("month", op.month, op.month_limit)):
                used, reserved = current.get((op.client_id, period), (0, 0))
                d = deltas[(op.client_id, period)]
                if limit is not None and used + reserved + d[0] + d[1] + op.tokens > limit:
                    refused = kind
                    break
            results[i] = refused
            if refused is None:
                deltas[(op.client_id, op.day)][1] += op.tokens
                deltas[(op.client_id, op.month)][1] += op.tokens
                if op.lease_id in admitted:
                    admitted[op.lease_id].tokens += op.tokens
                else:
                    admitted[op.lease_id] = Grant(**{f: getattr(op, f)
                                                     for f in Grant.__dataclass_fields__})
        if admitted:
            now = datetime.now(UTC)
            stmt = self._insert(reservations)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["id"],
                set_={"tokens": Lease.tokens + stmt.excluded.tokens,
                      "expires_at": stmt.excluded.expires_at}),
                [{"id": g.lease_id, "client_id": g.client_id, "day": g.day, "month": g.month,
                  "tokens": g.tokens, "created_at": now, "expires_at": g.expires_at}
                 for _, g in sorted(admitted.items())])

    async def _add(self, conn: AsyncConnection,
                   deltas: dict[tuple[str, str], list[int]]) -> None:
        """Add (used, reserved) increments to counters, creating rows as needed: one
        statement, rows in a fixed order."""
        changed = [(k, d) for k, d in sorted(deltas.items()) if d[0] or d[1]]
        if not changed:
            return
        stmt = self._insert(budget_counters)
        await conn.execute(stmt.on_conflict_do_update(
            index_elements=["client_id", "period"],
            set_={"used": Counter.used + stmt.excluded.used,
                  "reserved": Counter.reserved + stmt.excluded.reserved}),
            [{"client_id": c, "period": p, "used": d[0], "reserved": d[1]}
             for (c, p), d in changed])

    async def _locked_counters(
            self, conn: AsyncConnection,
            keys: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, int]]:
        query = (select(Counter.client_id, Counter.period, Counter.used, Counter.reserved)
                 .where(tuple_(Counter.client_id, Counter.period).in_(sorted(keys)))
                 .order_by(Counter.client_id, Counter.period))
        if self._dialect == "postgresql":
            query = query.with_for_update()
        rows = (await conn.execute(query)).all()
        found = {(r.client_id, r.period): (r.used, r.reserved) for r in rows}
        missing = keys - set(found)
        if missing:
            # First request of a period: create the rows, then lock them (another gateway
            # may have created them at the same moment).
            await conn.execute(self._insert(budget_counters).on_conflict_do_nothing(
                index_elements=["client_id", "period"]),
                [{"client_id": c, "period": p, "used": 0, "reserved": 0}
                 for c, p in sorted(missing)])
            rows = (await conn.execute(query)).all()
            found = {(r.client_id, r.period): (r.used, r.reserved) for r in rows}
        return found

    async def sweep(self, now: datetime) -> int:
        """Release reservations whose gateway never settled them (it died). Returns how many."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(
                delete(reservations).where(reservations.c.expires_at < now)
                .returning(reservations.c.client_id, reservations.c.day, reservations.c.month,
                           reservations.c.tokens))).all()
            deltas: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
            for r in rows:
                deltas[(r.client_id, r.day)][1] -= r.tokens
                deltas[(r.client_id, r.month)][1] -= r.tokens
            await self._add(conn, deltas)
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
