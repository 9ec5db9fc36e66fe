"""API keys: issue, verify, rotate, revoke. Only an HMAC-SHA256 of a key under the server pepper
is kept.

A key reads ``sk-enc-<12 hex id>-<43 url-safe chars>``. The id is public: it finds the row
without scanning and names the key in logs. The secret part never leaves this module except in
the one response to ``issue``; verification compares digests in constant time. Results are cached
for a few seconds (bounded), so the hot path rarely touches the database and a revocation still
takes effect on every gateway within ``cache_ttl_s``. OAuth client secrets are keys of kind
``secret``: same storage, rotation and revocation, but good only at ``/oauth/token``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from serving.storage.keys import KeyRecord, KeyRepository

log = logging.getLogger("enclave.auth")
PREFIX = "sk-enc-"
ID_HEX = 12
_SECRET_BYTES = 32
_KEY_LEN = len(PREFIX) + ID_HEX + 1 + 43
_CACHE_MAX = 10_000
KINDS = ("api", "secret")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the client, how it proved it (a key id or a token), what it may do.
    Never the key or the token."""

    key_id: str
    name: str
    client_id: str | None = None
    policy: str | None = None
    scopes: frozenset[str] = frozenset()
    via: str = "key"  # "key" | "token"


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
        self._used: dict[str, datetime] = {}

    def digest(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    async def issue(self, client_id: str, scopes: Iterable[str], *, name: str = "",
                    kind: str = "api", expires_at: datetime | None = None,
                    rotated_from: str | None = None) -> IssuedKey:
        name = name.strip() or client_id
        if len(name) > 200:
            raise ValueError("a key name must be at most 200 characters")
        if kind not in KINDS:
            raise ValueError(f"a key kind is one of {', '.join(KINDS)}")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise ValueError("the expiry must be in the future")
        key_id = secrets.token_hex(ID_HEX // 2)
        key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(_SECRET_BYTES)}"
        record = await self._repo.add(key_id, name, self.digest(key), client_id=client_id,
                                      scopes=scopes, kind=kind, expires_at=expires_at,
                                      rotated_from=rotated_from)
        return IssuedKey(key=key, record=record)

    async def rotate(self, key_id: str, grace: timedelta | None,
                     expires_at: datetime | None = None) -> tuple[IssuedKey, KeyRecord]:
        """A new key with the same client, scopes and kind. The old one stays valid for
        ``grace`` (None: until revoked), so callers can switch without an outage."""
        old = await self._repo.get(key_id)
        if old is None or not old.active or old.client_id is None:
            raise LookupError(f"no active key with id {key_id!r}")
        if expires_at is None and old.expires_at is not None:
            expires_at = datetime.now(UTC) + (old.expires_at - old.created_at)
        issued = await self.issue(old.client_id, old.scopes, name=old.name, kind=old.kind,
                                  expires_at=expires_at, rotated_from=old.id)
        if grace is not None:
            await self._repo.expire(old.id, datetime.now(UTC) + grace)
            self._cache.pop(old.id, None)
        return issued, old

    async def verify(self, key: str, kind: str = "api") -> KeyRecord | None:
        """The key's record if the key is genuine, active, unexpired, of this kind and its
        client is enabled; else None."""
        key_id = split_key(key)
        if key_id is None:
            return None
        record = await self._lookup(key_id)
        # Always compute and compare, so an unknown id costs the same as a wrong secret.
        expected = record.digest if record is not None else "0" * 64
        matches = hmac.compare_digest(self.digest(key), expected)
        now = datetime.now(UTC)
        if record is None or not matches or record.kind != kind or not record.usable(now):
            return None
        self._used[record.id] = now
        return record

    def principal(self, record: KeyRecord) -> Principal:
        return Principal(key_id=record.id, name=record.name, client_id=record.client_id,
                         policy=record.client_policy, scopes=record.scopes, via="key")

    async def revoke(self, key_id_or_name: str) -> list[KeyRecord]:
        revoked = await self._repo.revoke(key_id_or_name)
        for record in revoked:
            self._cache.pop(record.id, None)
        return revoked

    async def all(self, client_id: str | None = None) -> list[KeyRecord]:
        return await self._repo.all(client_id)

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._repo.get(key_id)

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        try:
            await self._repo.touch(used)
        except Exception:  # last-used is informative; never fail a request on it
            log.warning("could not record key last-used times", exc_info=True)

    async def keep_last_used(self, interval_s: float) -> None:
        """Write last-used times in batches: one statement every few seconds, not per request."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush_last_used()

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
