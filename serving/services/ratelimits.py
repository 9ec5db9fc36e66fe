"""Per-client rate limits with the ``limits`` library, and a concurrency cap.

One gateway keeps counters in memory; several gateways share them through Redis
(``ENCLAVE_REDIS_URL``), so a limit of 60 requests a minute means 60 across all replicas, not 60
per replica. Requests per minute use a moving window (exact); tokens per minute a sliding window
counter charged with each response's real usage, checked before the next request is admitted.
Concurrent requests are leases in a Redis sorted set (or a local counter) that expire if a
gateway dies holding them.

If Redis is unreachable, limits fall back to this gateway's own counters (logged, counted), so
an outage of the limit store degrades sharing rather than the service.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving.storage.policies import Limits

log = logging.getLogger("enclave.ratelimits")

# KEYS[1] = lease set; ARGV = now, expiry, member, limit. Drops expired leases, then adds one
# if there is room. Atomic in Redis, so two gateways cannot both take the last slot.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil((ARGV[2] - ARGV[1]) * 1000))
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Denied:
    what: str  # "requests" | "tokens" | "concurrent"
    retry_after_s: int


class _Counters:
    def __init__(self, storage: Storage) -> None:
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = SlidingWindowCounterRateLimiter(storage)


class RateLimiter:
    def __init__(self, redis_url: str | None, lease_ttl_s: float) -> None:
        self._local = _Counters(MemoryStorage())
        self._shared: _Counters | None = None
        self._redis: Redis | None = None
        self._lease_ttl = lease_ttl_s
        self._local_leases: dict[str, int] = {}
        self._local_ids: set[str] = set()
        self._items: dict[int, RateLimitItemPerMinute] = {}
        self.fallbacks = 0
        if redis_url:
            self._shared = _Counters(RedisStorage(f"async+{redis_url}", implementation="redispy",
                                                  key_prefix="enclave"))
            self._redis = Redis.from_url(redis_url)
            self._acquire = self._redis.register_script(_ACQUIRE)

    @property
    def shared(self) -> bool:
        return self._shared is not None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _item(self, per_minute: int) -> RateLimitItemPerMinute:
        item = self._items.get(per_minute)
        if item is None:
            item = self._items[per_minute] = RateLimitItemPerMinute(per_minute)
        return item

    def _fell_back(self, exc: Exception) -> None:
        self.fallbacks += 1
        if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
            log.warning("rate-limit store unreachable: limits are per gateway until it is back",
                        extra={"reason": type(exc).__name__, "times": self.fallbacks})

    async def admit(self, client_id: str, limits: Limits) -> Denied | None:
        """Count one request; None when admitted."""
        counters = self._shared or self._local
        try:
            return await self._admit(counters, client_id, limits)
        except (RedisError, OSError) as exc:
            self._fell_back(exc)
            return await self._admit(self._local, client_id, limits)

    async def _admit(self, c: _Counters, client_id: str, limits: Limits) -> Denied | None:
        if limits.tokens_per_minute is not None:
            item = self._item(limits.tokens_per_minute)
            if not await c.tokens.test(item, "tpm", client_id):
                return Denied("tokens", await self._retry_after(c.tokens, item, client_id, "tpm"))
        if limits.requests_per_minute is not None:
            item = self._item(limits.requests_per_minute)
            if not await c.requests.hit(item, "rpm", client_id):
                return Denied("requests",
                              await self._retry_after(c.requests, item, client_id, "rpm"))
        return None

    @staticmethod
    async def _retry_after(limiter: MovingWindowRateLimiter | SlidingWindowCounterRateLimiter,
                           item: RateLimitItemPerMinute, client_id: str, kind: str) -> int:
        stats = await limiter.get_window_stats(item, kind, client_id)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def charge_tokens(self, client_id: str, limits: Limits, tokens: int) -> None:
        """Charge a response's real token usage to the tokens-per-minute window."""
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        item = self._item(limits.tokens_per_minute)
        # Never more than the limit in one go, or one large answer would lock the window out.
        cost = min(tokens, limits.tokens_per_minute)
        counters = self._shared or self._local
        try:
            await counters.tokens.hit(item, "tpm", client_id, cost=cost)
        except (RedisError, OSError) as exc:
            self._fell_back(exc)
            await self._local.tokens.hit(item, "tpm", client_id, cost=cost)

    async def acquire(self, client_id: str, limit: int | None, lease_id: str) -> bool:
        """Take one of the client's ``limit`` concurrent slots."""
        if limit is None:
            return True
        if self._redis is not None:
            now = time.time()
            try:
                got = await self._acquire(keys=[f"enclave:conc:{client_id}"],
                                          args=[now, now + self._lease_ttl, lease_id, limit])
                return bool(got)
            except (RedisError, OSError) as exc:
                self._fell_back(exc)
        held = self._local_leases.get(client_id, 0)
        if held >= limit:
            return False
        self._local_leases[client_id] = held + 1
        self._local_ids.add(lease_id)
        return True

    async def release(self, client_id: str, limit: int | None, lease_id: str) -> None:
        if limit is None:
            return
        if lease_id in self._local_ids:
            self._local_ids.discard(lease_id)
            held = self._local_leases.get(client_id, 0)
            if held <= 1:
                self._local_leases.pop(client_id, None)
            else:
                self._local_leases[client_id] = held - 1
            return
        if self._redis is not None:
            try:
                await self._redis.zrem(f"enclave:conc:{client_id}", lease_id)
                return
            except (RedisError, OSError) as exc:
                self._fell_back(exc)  # the lease expires in Redis by itself
