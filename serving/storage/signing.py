"""Rows of token signing keys. The private half is stored sealed; see ``services.tokens``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import signing_keys
from serving.storage.times import utc


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    algorithm: str
    sealed_private_key: str
    public_jwk: str
    created_at: datetime
    retired_at: datetime | None


class SigningKeyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, kid: str, algorithm: str, sealed: str, public_jwk: str,
                  retire_others: bool) -> SigningKeyRecord:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            if retire_others:
                await conn.execute(update(signing_keys).where(signing_keys.c.retired_at.is_(None))
                                   .values(retired_at=now))
            await conn.execute(insert(signing_keys).values(
                kid=kid, algorithm=algorithm, sealed_private_key=sealed, public_jwk=public_jwk,
                created_at=now, retired_at=None))
        return SigningKeyRecord(kid, algorithm, sealed, public_jwk, now, None)

    async def all(self) -> list[SigningKeyRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(signing_keys)
                                       .order_by(signing_keys.c.created_at))).all()
        return [SigningKeyRecord(r.kid, r.algorithm, r.sealed_private_key, r.public_jwk,
                                 utc(r.created_at), utc(r.retired_at)) for r in rows]
