"""Rows of API keys. Holds digests only: a raw key never reaches this module."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import api_keys


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    digest: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _record(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return KeyRecord(id=m["id"], name=m["name"], digest=m["digest"],
                     created_at=m["created_at"], revoked_at=m["revoked_at"])


class KeyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, key_id: str, name: str, digest: str) -> KeyRecord:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await conn.execute(insert(api_keys).values(
                id=key_id, name=name, digest=digest, created_at=now, revoked_at=None))
        return KeyRecord(key_id, name, digest, now, None)

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _record(row) if row is not None else None

    async def all(self) -> list[KeyRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(api_keys).order_by(api_keys.c.created_at))).all()
        return [_record(r) for r in rows]

    async def revoke(self, key_id_or_name: str) -> list[KeyRecord]:
        """Revoke the key with this id, or every active key with this name."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            target = (api_keys.c.id == key_id_or_name) | (api_keys.c.name == key_id_or_name)
            rows = (await conn.execute(
                select(api_keys).where(target, api_keys.c.revoked_at.is_(None)))).all()
            if rows:
                await conn.execute(update(api_keys)
                                   .where(api_keys.c.id.in_([r.id for r in rows]))
                                   .values(revoked_at=now))
        return [_record(r) for r in rows]
