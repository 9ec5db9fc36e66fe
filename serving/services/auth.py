"""API keys: issue, verify, revoke. Only an HMAC-SHA256 of a key under the server pepper is kept.

A key reads ``sk-enc-<12 hex id>-<43 url-safe chars>``. The id is public: it finds the row
without scanning and names the key in logs. The secret part never leaves this module except in
the one response to ``issue``; verification compares digests in constant time. Results are cached
for a few seconds (bounded), so the hot path rarely touches the database and a revocation still
takes effect everywhere within ``cache_ttl_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from serving.storage.keys import KeyRecord, KeyRepository

PREFIX = "sk-enc-"
ID_HEX = 12
_SECRET_BYTES = 32
_KEY_LEN = len(PREFIX) + ID_HEX + 1 + 43
_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key id and its name. Never the key."""

    key_id: str
    name: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str
    record: KeyRecord


def split_key(key: str) -> str | None:
    """Return the key id if ``key`` has the shape of an Enclave key, else None."""
    if len(key) != _KEY_LEN or not key.startswith(PREFIX) or key[len(PREFIX) + ID_HEX] != "-":
        return None
    key_id = key[len(PREFIX):len(PREFIX) + ID_HEX]
    if any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id


class KeyService:
    def __init__(self, repo: KeyRepository, pepper: bytes, cache_ttl_s: float = 2.0) -> None:
        if not pepper:
            raise ValueError("empty pepper")
        self._repo = repo
        self._pepper = pepper
        self._ttl = cache_ttl_s
        # key id -> (expires at, record or None when unknown)
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}

    def digest(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    async def issue(self, name: str) -> IssuedKey:
        name = name.strip()
        if not name or len(name) > 200:
            raise ValueError("a key name must be 1 to 200 characters")
        key_id = secrets.token_hex(ID_HEX // 2)
        key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(_SECRET_BYTES)}"
        record = await self._repo.add(key_id, name, self.digest(key))
        return IssuedKey(key=key, record=record)

    async def verify(self, key: str) -> Principal | None:
        key_id = split_key(key)
        if key_id is None:
            return None
        record = await self._lookup(key_id)
        # Always compute and compare, so an unknown id costs the same as a wrong secret.
        expected = record.digest if record is not None else "0" * 64
        matches = hmac.compare_digest(self.digest(key), expected)
        if record is None or not matches or not record.active:
            return None
        return Principal(key_id=record.id, name=record.name)

    async def revoke(self, key_id_or_name: str) -> list[KeyRecord]:
        revoked = await self._repo.revoke(key_id_or_name)
        for record in revoked:
            self._cache.pop(record.id, None)
        return revoked

    async def all(self) -> list[KeyRecord]:
        return await self._repo.all()

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        # Single flight: when an entry expires under load, one query refreshes it for all.
        pending = self._pending.get(key_id)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key_id))
            self._pending[key_id] = pending
        return await asyncio.shield(pending)

    async def _fetch(self, key_id: str) -> KeyRecord | None:
        try:
            record = await self._repo.get(key_id)
        finally:
            self._pending.pop(key_id, None)
        self._cache[key_id] = (time.monotonic() + self._ttl, record)
        self._cache.move_to_end(key_id)
        while len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return record
