"""Rows of clients: the products and services that own keys and follow one policy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import clients
from serving.storage.times import utc


@dataclass(frozen=True, slots=True)
class ClientRecord:
    id: str
    policy: str
    description: str
    created_at: datetime
    disabled_at: datetime | None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


def _record(row: object) -> ClientRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return ClientRecord(id=m["id"], policy=m["policy"], description=m["description"],
                        created_at=utc(m["created_at"]), disabled_at=utc(m["disabled_at"]))


class ClientExists(ValueError):
    pass


class ClientRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, client_id: str, policy: str, description: str = "") -> ClientRecord:
        now = datetime.now(UTC)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(clients).values(
                    id=client_id, policy=policy, description=description, created_at=now))
        except IntegrityError:
            raise ClientExists(f"a client named {client_id!r} exists already") from None
        return ClientRecord(client_id, policy, description, now, None)

    async def get(self, client_id: str) -> ClientRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(clients).where(clients.c.id == client_id))).first()
        return _record(row) if row is not None else None

    async def all(self) -> list[ClientRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(clients).order_by(clients.c.id))).all()
        return [_record(r) for r in rows]

    async def update(self, client_id: str, *, policy: str | None = None,
                     description: str | None = None,
                     disabled: bool | None = None) -> ClientRecord | None:
        values: dict[str, object] = {}
        if policy is not None:
            values["policy"] = policy
        if description is not None:
            values["description"] = description
        if disabled is not None:
            values["disabled_at"] = datetime.now(UTC) if disabled else None
        if values:
            async with self._engine.begin() as conn:
                await conn.execute(update(clients).where(clients.c.id == client_id)
                                   .values(**values))
        return await self.get(client_id)
