"""Concurrency slots shared by two gateways through a real Redis, and limits in memory."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission.ratelimits import RateLimiter
from serving.bench.stores import RedisServer
from serving.domain.policy import Limits

pytestmark = pytest.mark.anyio



async def test_two_gateways_never_exceed_a_shared_concurrency_limit(
        redis_server: RedisServer) -> None:
    redis_server.flush()
    a, b = RateLimiter(redis_server.url, 60), RateLimiter(redis_server.url, 60)
    tasks = [asyncio.create_task(x.maintain(0.2)) for x in (a, b)]
    try:
        taken = [await a.acquire("acme", 5, f"a{i}") for i in range(3)]
        taken += [await b.acquire("acme", 5, f"b{i}") for i in range(4)]
        assert taken == [True] * 5 + [False] * 2  # 5 across both gateways, not 5 each
        await a.release("acme", 5, "a0")
        assert not await b.acquire("acme", 5, "b9")  # a still holds the slot it freed...
        await asyncio.sleep(1.5)  # ...until it has been idle a second: then it is given back
        assert await b.acquire("acme", 5, "b10")
    finally:
        for t in tasks:
            t.cancel()
        await a.close()
        await b.close()


async def test_a_large_limit_takes_slots_in_chunks(redis_server: RedisServer) -> None:
    redis_server.flush()
    limiter = RateLimiter(redis_server.url, 60)
    for i in range(8):
        assert await limiter.acquire("big", 1000, f"r{i}")
    held = await limiter._redis.zcard("enclave:conc:big")  # type: ignore[union-attr]
    assert held == 8  # one round trip took 8 slots, used by 8 requests
    await limiter.close()
    other = RateLimiter(redis_server.url, 60)
    assert await other._redis.zcard("enclave:conc:big") == 0  # type: ignore[union-attr]
    await other.close()  # closing gave them back


async def test_requests_per_minute_in_memory() -> None:
    limiter = RateLimiter(None, 60)
    limits = Limits(requests_per_minute=10)
    results = [await limiter.admit("acme", limits) for _ in range(12)]
    assert results[:10] == [None] * 10
    denied = results[10]
    assert denied is not None and denied.what == "requests" and 1 <= denied.retry_after_s <= 60
