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

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from serving.domain.principal import Principal
from serving.storage.keys import KeyRecord, KeyRepository

log = logging.getLogger("enclave.auth")
PREFIX = "sk-enc-"
ID_HEX = 12
_SECRET_BYTES = 32
_KEY_LEN = len(PREFIX) + ID_HEX + 1 + 43
_CACHE_MAX = 10_000
_UNKNOWN_MAX = 50_000
KINDS = ("api", "secret")


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


class LookupsThrottled(Exception):
    """This address has looked up too many unknown key ids lately."""


class KeyService:
    """``unknown_per_minute``: database lookups of key ids that match no key, per client
    address and minute. A well-formed key with a made-up id costs a query (once: the miss is
    cached); past the budget, an address's uncached ids are refused without one, so a flood of
    random ids can neither load the database nor evict real keys from the cache. Ids that
    resolve (real keys) never count."""

    def __init__(self, repo: KeyRepository, pepper: bytes, cache_ttl_s: float = 2.0,
                 unknown_per_minute: int = 600) -> None:
        if not pepper:
            raise ValueError("empty pepper")
        self._repo = repo
        self._pepper = pepper
        self._ttl = cache_ttl_s
        self._unknown_limit = RateLimitItemPerMinute(unknown_per_minute)
        self._misses = MovingWindowRateLimiter(MemoryStorage())
        # key id -> (expires at, record); ids that matched no key live apart, so that a flood
        # of made-up ids costs one query each at most and never evicts a real key.
        self._cache: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
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
        self._unknown.pop(key_id, None)
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

    async def verify(self, key: str, kind: str = "api",
                     address: str | None = None) -> KeyRecord | None:
        """The key's record if the key is genuine, active, unexpired, of this kind and its
        client is enabled; else None. Raises ``LookupsThrottled`` when ``address`` is past its
        budget of unknown-id lookups and the id is not cached."""
        key_id = split_key(key)
        if key_id is None:
            return None
        record = await self._lookup(key_id, address)
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

    async def _lookup(self, key_id: str, address: str | None = None) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        unknown_until = self._unknown.get(key_id)
        if unknown_until is not None and unknown_until > now:
            return None
        if address is not None and not self._misses.test(self._unknown_limit, address):
            raise LookupsThrottled
        # Single flight: when an entry expires under load, one query refreshes it for all.
        pending = self._pending.get(key_id)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key_id))
            self._pending[key_id] = pending
        record = await asyncio.shield(pending)
        if record is None and address is not None:
            self._misses.hit(self._unknown_limit, address)
        return record

    async def _fetch(self, key_id: str) -> KeyRecord | None:
        try:
            record = await self._repo.get(key_id)
        finally:
            self._pending.pop(key_id, None)
        expires = time.monotonic() + self._ttl
        if record is None:
            self._cache.pop(key_id, None)
            self._unknown[key_id] = expires
            self._unknown.move_to_end(key_id)
            while len(self._unknown) > _UNKNOWN_MAX:
                self._unknown.popitem(last=False)
            return None
        self._unknown.pop(key_id, None)
        self._cache[key_id] = (expires, record)
        self._cache.move_to_end(key_id)
        while len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return record
