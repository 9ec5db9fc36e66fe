"""Rows of API keys and OAuth client secrets. Holds digests only: a raw key never reaches this
module. A key belongs to a client, carries scopes, may expire, and records when it was last used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.storage.db import api_keys, clients
from serving.storage.times import utc


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    digest: str
    created_at: datetime
    revoked_at: datetime | None
    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    kind: str = "api"
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    rotated_from: str | None = None
    # From the client row, joined on lookup.
    client_policy: str | None = None
    client_disabled: bool = False

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def usable(self, now: datetime) -> bool:
        return self.active and not self.expired(now) and not self.client_disabled

    def public(self) -> dict[str, object]:
        """What the admin API and the CLI may show: never the digest."""
        return {
            "id": self.id, "name": self.name, "client": self.client_id, "kind": self.kind,
            "scopes": sorted(self.scopes), "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at), "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at), "rotated_from": self.rotated_from,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _record(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return KeyRecord(
        id=m["id"], name=m["name"], digest=m["digest"], created_at=utc(m["created_at"]),
        revoked_at=utc(m["revoked_at"]), client_id=m["client_id"],
        scopes=frozenset(m["scopes"].split()), kind=m["kind"], expires_at=utc(m["expires_at"]),
        last_used_at=utc(m["last_used_at"]), rotated_from=m["rotated_from"],
        client_policy=m.get("policy"), client_disabled=m.get("disabled_at") is not None)


_JOINED = (select(api_keys, clients.c.policy, clients.c.disabled_at)
           .select_from(api_keys.outerjoin(clients, api_keys.c.client_id == clients.c.id)))


class KeyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, key_id: str, name: str, digest: str, *, client_id: str,
                  scopes: Iterable[str], kind: str = "api", expires_at: datetime | None = None,
                  rotated_from: str | None = None) -> KeyRecord:
        now = datetime.now(UTC)
        scope_set = frozenset(scopes)
        async with self._engine.begin() as conn:
            await conn.execute(insert(api_keys).values(
                id=key_id, name=name, digest=digest, created_at=now, revoked_at=None,
                client_id=client_id, scopes=" ".join(sorted(scope_set)), kind=kind,
                expires_at=expires_at, rotated_from=rotated_from))
        return KeyRecord(key_id, name, digest, now, None, client_id, scope_set, kind,
                         expires_at, None, rotated_from)

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(_JOINED.where(api_keys.c.id == key_id))).first()
        return _record(row) if row is not None else None

    async def all(self, client_id: str | None = None) -> list[KeyRecord]:
        query = _JOINED.order_by(api_keys.c.created_at)
        if client_id is not None:
            query = query.where(api_keys.c.client_id == client_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_record(r) for r in rows]

    async def revoke(self, key_id_or_name: str) -> list[KeyRecord]:
        """Revoke the key with this id, or every active key with this name."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            target = (api_keys.c.id == key_id_or_name) | (api_keys.c.name == key_id_or_name)
            rows = (await conn.execute(
                _JOINED.where(target, api_keys.c.revoked_at.is_(None)))).all()
            if rows:
                await conn.execute(update(api_keys)
                                   .where(api_keys.c.id.in_([r.id for r in rows]))
                                   .values(revoked_at=now))
        return [_record(r) for r in rows]

    async def touch(self, used: dict[str, datetime]) -> None:
        """Record last-used times, in one statement for many keys."""
        if not used:
            return
        stmt = (update(api_keys)
                .where(and_(api_keys.c.id == bindparam("key_id"),
                            (api_keys.c.last_used_at.is_(None))
                            | (api_keys.c.last_used_at < bindparam("at"))))
                .values(last_used_at=bindparam("at")))
        async with self._engine.begin() as conn:
            await conn.execute(stmt, [{"key_id": k, "at": at} for k, at in used.items()])

    async def expire(self, key_id: str, at: datetime) -> None:
        """Bring a key's expiry forward to ``at`` (never later than it was)."""
        async with self._engine.begin() as conn:
            await conn.execute(update(api_keys).where(
                api_keys.c.id == key_id,
                api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > at))
                .values(expires_at=at))
