"""Rows of idempotency keys: who holds a key, for which body, and the answer it got.

One row per (client, key digest). A row is **pending** while a gateway runs the request (its
``owner`` token holds a lease it keeps renewing) and **done** once the answer is stored, until
``expires_at``. Every write is one statement, atomic on its own on SQLite (one writer) and on
PostgreSQL (a row-level conflict or a re-checked ``WHERE`` under READ COMMITTED), so two gateways
racing for one key cannot both win:

- ``claim``: ``INSERT … ON CONFLICT DO NOTHING``; when the row exists, a conditional ``UPDATE``
  takes it over only if its claim is dead (lease expired: the gateway crashed) or the row
  itself expired;
- ``complete``, ``renew`` and ``release`` touch the row only while its owner still holds it;
- ``sweep`` deletes expired rows in bounded batches.

This module never sees a raw key, a request body or a plaintext answer: the caller hands it
digests and sealed bytes (``admission.idempotency``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, and_, delete, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import dialect_insert, idempotency_keys
from serving.storage.times import utc

Row = idempotency_keys.c
PENDING = "pending"
DONE = "done"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    client_id: str
    key_hash: str
    body_hash: str
    state: str  # PENDING | DONE
    owner: str | None
    lease_expires_at: datetime | None
    status: int | None
    answer: bytes | None  # sealed; None on a done row: the answer was not kept
    model: str | None
    created_at: datetime
    expires_at: datetime

    @property
    def done(self) -> bool:
        return self.state == DONE


def _record(row: object) -> IdempotencyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    answer = m["answer"]
    return IdempotencyRecord(
        client_id=m["client_id"], key_hash=m["key_hash"], body_hash=m["body_hash"],
        state=m["state"], owner=m["owner"], lease_expires_at=utc(m["lease_expires_at"]),
        status=m["status"], answer=bytes(answer) if answer is not None else None,
        model=m["model"], created_at=utc(m["created_at"]), expires_at=utc(m["expires_at"]))


class IdempotencyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def _insert(self, table: Table):  # type: ignore[no-untyped-def]
        return dialect_insert(self._engine, table)

    @staticmethod
    def _key(client_id: str, key_hash: str):  # type: ignore[no-untyped-def]
        return and_(Row.client_id == client_id, Row.key_hash == key_hash)

    async def claim(self, client_id: str, key_hash: str, body_hash: str, owner: str, *,
                    now: datetime, lease_until: datetime, expires_at: datetime) -> bool:
        """Make ``owner`` the holder of a pending row for this key: a new row, a pending one
        whose claim died (lease past) or a done one that expired, whatever body either had.
        False: someone else holds a live row; read it with ``get``."""
        fresh = {"body_hash": body_hash, "state": PENDING, "owner": owner,
                 "lease_expires_at": lease_until, "status": None, "answer": None,
                 "model": None, "created_at": now, "expires_at": expires_at}
        async with self._engine.begin() as conn:
            inserted = (await conn.execute(
                self._insert(idempotency_keys)
                .values(client_id=client_id, key_hash=key_hash, **fresh)
                .on_conflict_do_nothing(index_elements=["client_id", "key_hash"])
                .returning(Row.owner))).first()
        if inserted is not None:
            return True
        async with self._engine.begin() as conn:
            taken = await conn.execute(
                update(idempotency_keys)
                .where(self._key(client_id, key_hash),
                       or_(and_(Row.state == DONE, Row.expires_at <= now),
                           and_(Row.state == PENDING, Row.lease_expires_at <= now)))
                .values(**fresh))
        return taken.rowcount == 1

    async def get(self, client_id: str, key_hash: str) -> IdempotencyRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                select(idempotency_keys).where(self._key(client_id, key_hash)))).first()
        return _record(row) if row is not None else None

    async def complete(self, client_id: str, key_hash: str, owner: str, *, status: int,
                       answer: bytes | None, model: str) -> bool:
        """Store the answer (sealed; None: not kept) on the owner's pending row. False: the
        claim was lost (taken over after its lease expired, or swept)."""
        async with self._engine.begin() as conn:
            done = await conn.execute(
                update(idempotency_keys)
                .where(self._key(client_id, key_hash), Row.state == PENDING,
                       Row.owner == owner)
                .values(state=DONE, owner=None, lease_expires_at=None, status=status,
                        answer=answer, model=model))
        return done.rowcount == 1

    async def renew(self, client_id: str, key_hash: str, owner: str,
                    lease_until: datetime) -> bool:
        """Extend the owner's lease. False: the claim was lost."""
        async with self._engine.begin() as conn:
            renewed = await conn.execute(
                update(idempotency_keys)
                .where(self._key(client_id, key_hash), Row.state == PENDING,
                       Row.owner == owner)
                .values(lease_expires_at=lease_until))
        return renewed.rowcount == 1

    async def release(self, client_id: str, key_hash: str, owner: str) -> bool:
        """Delete the owner's pending row, so the next request with this key runs."""
        async with self._engine.begin() as conn:
            gone = await conn.execute(
                delete(idempotency_keys)
                .where(self._key(client_id, key_hash), Row.state == PENDING,
                       Row.owner == owner))
        return gone.rowcount == 1

    async def sweep(self, now: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired rows (never a pending one whose lease is live).
        Returns how many."""
        expired = (select(Row.client_id, Row.key_hash)
                   .where(Row.expires_at <= now,
                          or_(Row.state == DONE, Row.lease_expires_at <= now))
                   .limit(limit))
        async with self._engine.begin() as conn:
            gone = await conn.execute(
                delete(idempotency_keys)
                .where(tuple_(Row.client_id, Row.key_hash).in_(expired)))
        return gone.rowcount
