"""Per-client rate limits with the ``limits`` library, and a concurrency cap.

One gateway keeps counters in memory; several gateways share them through Redis
(``ENCLAVE_REDIS_URL``), so a limit of 60 requests a minute means 60 across all replicas, not 60
per replica. Both limits are sliding window counters (the previous minute's count, weighted by
how much of it is still in the window, plus this minute's); tokens per minute is charged with
each response's real usage and checked before the next request is admitted.
Concurrent requests are leases in a Redis sorted set (or a local counter) that expire if a
gateway dies holding them.

With Redis, a round trip per check would cost more than the rest of the gateway, so the shared
counters are used in bulk where that cannot let a client exceed its limit: requests per minute
are taken in small chunks (``hit(cost=k)``, at most 1/200 of the limit and 20, so a limit of 60
is still counted one by one), used up locally within a second (unused units only under-admit);
a "tokens per minute not reached" answer is reused for 100 ms, and token charges are sent every
100 ms in one hit (the window can be overshot by what is in flight, as with any token limit
checked before the answer's size is known).

If Redis is unreachable, limits fall back to this gateway's own counters (logged, counted), so
an outage of the limit store degrades sharing rather than the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving.domain.policy import Limits

log = logging.getLogger("enclave.ratelimits")

# KEYS[1] = the client's slot set; ARGV = now, expiry, limit, slot ids... Drops expired slots,
# then adds as many of the given slots as there is room for; returns how many. Atomic in Redis,
# so two gateways cannot both take the last slot.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local room = tonumber(ARGV[3]) - redis.call('ZCARD', KEYS[1])
local added = 0
for i = 4, #ARGV do
  if added >= room then break end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  added = added + 1
end
if added > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil((ARGV[2] - ARGV[1]) * 1000))
end
return added
"""
_SLOT_CHUNK_MAX = 8
_SLOT_IDLE_S = 1.0


def _slot_key(client_id: str) -> str:
    return f"enclave:conc:{client_id}"


@dataclass(slots=True)
class _Slots:
    """Concurrency slots this gateway holds in Redis for one client."""

    ids: list[str]
    in_use: int = 0
    last_used: float = 0.0


_RPM_CHUNK_MAX = 20
_RPM_CHUNK_SHARE = 200
_CHUNK_LIFE_S = 1.0
_TPM_CACHE_S = 0.1
_TPM_FLUSH_S = 0.1


@dataclass(frozen=True, slots=True)
class Denied:
    what: str  # "requests" | "tokens" | "concurrent"
    retry_after_s: int


class _Counters:
    def __init__(self, storage: Storage) -> None:
        # Sliding window counters: two counters per client and window instead of one entry
        # per request (a moving window's list costs a scan per request and a background
        # sweep over every entry, measured at ~10% of the gateway's CPU under load).
        self.requests = SlidingWindowCounterRateLimiter(storage)
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
        self._rpm_chunks: dict[str, tuple[int, float]] = {}  # client -> (units left, until)
        self._tpm_ok_until: dict[str, float] = {}
        self._tpm_pending: dict[str, tuple[int, int]] = {}  # client -> (tokens, limit)
        self._tpm_flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: dict[str, _Slots] = {}
        self.fallbacks = 0
        self._shared_storage: RedisStorage | None = None
        if redis_url:
            self._shared_storage = RedisStorage(f"async+{redis_url}", implementation="redispy",
                                                key_prefix="enclave")
            self._shared = _Counters(self._shared_storage)
            self._redis = Redis.from_url(redis_url)
            self._acquire = self._redis.register_script(_ACQUIRE)

    @property
    def shared(self) -> bool:
        return self._shared is not None

    async def close(self) -> None:
        if self._redis is not None:
            for client_id, slots in self._slots.items():
                if slots.ids:
                    with contextlib.suppress(RedisError, OSError):
                        await self._redis.zrem(_slot_key(client_id), *slots.ids)
            self._slots.clear()
        if self._tpm_flush is not None:
            self._tpm_flush.cancel()
        await self._flush_tokens()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
        if self._shared_storage is not None:
            # The limits library keeps its own redis client and has no close of its own.
            client = getattr(getattr(self._shared_storage, "bridge", None), "storage", None)
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def admit(self, client_id: str, limits: Limits,
                    count_tokens: bool = True) -> Denied | None:
        """Count one request; None when admitted. ``count_tokens``: also refuse it when the
        client is over its tokens per minute."""
        if self._shared is None:
            return await self._admit(self._local, client_id, limits, False, count_tokens)
        try:
            return await self._admit(self._shared, client_id, limits, True, count_tokens)
        except (RedisError, OSError) as exc:
            self._fell_back(exc)
            return await self._admit(self._local, client_id, limits, False, count_tokens)

    async def _admit(self, c: _Counters, client_id: str, limits: Limits, bulk: bool,
                     count_tokens: bool) -> Denied | None:
        now = time.monotonic()
        if count_tokens and limits.tokens_per_minute is not None and not (
                bulk and self._tpm_ok_until.get(client_id, 0.0) > now):
            item = self._item(limits.tokens_per_minute)
            if not await c.tokens.test(item, "tpm", client_id):
                self._tpm_ok_until.pop(client_id, None)
                return Denied("tokens", await self._retry_after(c.tokens, item, client_id, "tpm"))
            if bulk:
                self._tpm_ok_until[client_id] = now + _TPM_CACHE_S
        if limits.requests_per_minute is not None:
            limit = limits.requests_per_minute
            item = self._item(limit)
            if bulk:
                left, until = self._rpm_chunks.get(client_id, (0, 0.0))
                if left > 0 and until > now:
                    self._rpm_chunks[client_id] = (left - 1, until)
                    return None
                chunk = max(1, min(limit // _RPM_CHUNK_SHARE, _RPM_CHUNK_MAX))
                if chunk > 1 and await c.requests.hit(item, "rpm", client_id, cost=chunk):
                    self._rpm_chunks[client_id] = (chunk - 1, now + _CHUNK_LIFE_S)
                    return None
            if not await c.requests.hit(item, "rpm", client_id):
                return Denied("requests",
                              await self._retry_after(c.requests, item, client_id, "rpm"))
        return None

    @staticmethod
    async def _retry_after(limiter: SlidingWindowCounterRateLimiter,
                           item: RateLimitItemPerMinute, client_id: str, kind: str) -> int:
        stats = await limiter.get_window_stats(item, kind, client_id)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def charge_tokens(self, client_id: str, limits: Limits, tokens: int) -> None:
        """Charge a response's real token usage to the tokens-per-minute window."""
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        if self._shared is None:
            await self._hit_tokens(self._local, client_id, limits.tokens_per_minute, tokens)
            return
        held, _ = self._tpm_pending.get(client_id, (0, 0))
        self._tpm_pending[client_id] = (held + tokens, limits.tokens_per_minute)
        if self._tpm_flush is None:
            loop = asyncio.get_running_loop()
            self._tpm_flush = loop.call_later(_TPM_FLUSH_S,
                                              lambda: self._spawn(self._flush_tokens()))

    async def _flush_tokens(self) -> None:
        self._tpm_flush = None
        pending, self._tpm_pending = self._tpm_pending, {}
        for client_id, (tokens, limit) in pending.items():
            self._tpm_ok_until.pop(client_id, None)
            try:
                await self._hit_tokens(self._shared or self._local, client_id, limit, tokens)
            except (RedisError, OSError) as exc:
                self._fell_back(exc)
                await self._hit_tokens(self._local, client_id, limit, tokens)

    async def _hit_tokens(self, c: _Counters, client_id: str, limit: int, tokens: int) -> None:
        # Never more than the limit in one go, or one large answer would lock the window out.
        await c.tokens.hit(self._item(limit), "tpm", client_id, cost=min(tokens, limit))

    async def acquire(self, client_id: str, limit: int | None, lease_id: str) -> bool:
        """Take one of the client's ``limit`` concurrent slots.

        With Redis, a gateway takes slots a few at a time (at most a tenth of the limit and
        8; one at a time for small limits) and hands them to its requests locally; slots it no
        longer uses are given back after a second, and expire if the gateway dies."""
        if limit is None:
            return True
        if self._redis is not None:
            now = time.monotonic()
            slots = self._slots.get(client_id)
            if slots is None:
                slots = self._slots[client_id] = _Slots([])
            slots.last_used = now
            if slots.in_use < len(slots.ids):
                slots.in_use += 1
                return True
            want = max(1, min(limit // 10, _SLOT_CHUNK_MAX))
            ids = [f"{lease_id}.{i}" for i in range(want)]
            wall = time.time()
            try:
                got = int(await self._acquire(keys=[_slot_key(client_id)],
                                              args=[wall, wall + self._lease_ttl, limit, *ids]))
            except (RedisError, OSError) as exc:
                self._fell_back(exc)
            else:
                if got == 0:
                    return False
                slots.ids.extend(ids[:got])
                slots.in_use += 1
                return True
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
        slots = self._slots.get(client_id)
        if slots is not None and slots.in_use > 0:
            slots.in_use -= 1
            slots.last_used = time.monotonic()

    async def maintain(self, interval_s: float = 1.0) -> None:
        """Give back slots idle for a second; renew held ones well before they expire."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            renew = now - renewed >= self._lease_ttl / 3
            for client_id, slots in list(self._slots.items()):
                spare = len(slots.ids) - slots.in_use
                key = _slot_key(client_id)
                try:
                    if spare > 0 and now - slots.last_used >= _SLOT_IDLE_S:
                        freed, slots.ids = slots.ids[:spare], slots.ids[spare:]
                        assert self._redis is not None
                        await self._redis.zrem(key, *freed)
                    if renew and slots.ids:
                        assert self._redis is not None
                        expiry = time.time() + self._lease_ttl
                        await self._redis.zadd(key, dict.fromkeys(slots.ids, expiry), xx=True)
                except (RedisError, OSError) as exc:
                    self._fell_back(exc)
                if not slots.ids and slots.in_use == 0:
                    del self._slots[client_id]
            if renew:
                renewed = now
