"""Idempotency keys on real SQLite and real PostgreSQL: a duplicate gets the stored answer and
never runs again, another body under the same key is refused, concurrent duplicates (in one
process and across gateways) wait for the first, a dead gateway's claim is taken over, expired
keys are swept and free again, and the row holds neither the key nor the answer in clear."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.admission.idempotency import Claim, IdempotencyService, Replay
from serving.errors import (
    IdempotencyAnswerNotKept,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
)
from serving.storage import migrate
from serving.storage.db import create_engine, idempotency_keys
from serving.storage.idempotency import IdempotencyRepository

pytestmark = pytest.mark.anyio
PEPPER = b"p" * 32
KEY = "order-4711"
BODY = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "Hello"}]}'
ANSWER = b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "SECRET-OUTPUT"}}]}'



@pytest.fixture
async def engines(db_url: str) -> AsyncIterator[list[AsyncEngine]]:
    """Two gateways' connection pools on one database."""
    made = [create_engine(db_url), create_engine(db_url)]
    await migrate.upgrade(made[0])
    yield made
    for engine in made:
        await engine.dispose()


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC))


def service(engine: AsyncEngine, clock: Clock | None = None, **kw: Any) -> IdempotencyService:
    if clock is not None:
        kw["clock"] = clock
    return IdempotencyService(IdempotencyRepository(engine), PEPPER, **kw)


async def claim(svc: IdempotencyService, body: bytes = BODY, key: str = KEY) -> Claim:
    got = await svc.begin("acme", key, body, wait_s=0)
    assert isinstance(got, Claim)
    return got


async def rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(idempotency_keys))]


async def test_a_duplicate_gets_the_stored_answer_and_does_not_run_again(
        engines: list[AsyncEngine]) -> None:
    svc = service(engines[0])
    first = await claim(svc)
    assert await first.complete(200, ANSWER, "demo-chat")
    again = await svc.begin("acme", KEY, BODY, wait_s=0)
    assert again == Replay(200, ANSWER, "demo-chat")
    # Another gateway reads it from the database, and another client's same key is its own.
    assert await service(engines[1]).begin("acme", KEY, BODY, wait_s=0) == again
    other = await service(engines[1]).begin("globex", KEY, BODY, wait_s=0)
    assert isinstance(other, Claim)
    await other.release()


async def test_the_same_key_with_another_body_is_refused_without_echoing_either(
        engines: list[AsyncEngine]) -> None:
    svc = service(engines[0])
    held = await claim(svc)
    with pytest.raises(IdempotencyConflict) as pending:  # at once, while the first runs
        await svc.begin("acme", KEY, b'{"other": 1}', wait_s=5)
    await held.complete(200, ANSWER, "demo-chat")
    with pytest.raises(IdempotencyConflict) as done:
        await service(engines[1]).begin("acme", KEY, b'{"other": 1}', wait_s=5)
    for err in (pending.value, done.value):
        assert (err.status, err.type, err.code) == (422, "invalid_request_error",
                                                    "idempotency_key_reused")
        assert err.param == "Idempotency-Key"
        assert KEY not in err.message and "other" not in err.message


async def test_twenty_concurrent_duplicates_run_once_and_all_get_its_answer(
        engines: list[AsyncEngine]) -> None:
    svc = service(engines[0])
    runs = 0

    async def request() -> Replay:
        nonlocal runs
        got = await svc.begin("acme", KEY, BODY, wait_s=10)
        if isinstance(got, Replay):
            return got
        runs += 1
        await asyncio.sleep(0.2)  # the engine at work
        await got.complete(200, ANSWER, "demo-chat")
        return Replay(200, ANSWER, "demo-chat")

    answers = await asyncio.gather(*(request() for _ in range(20)))
    assert runs == 1
    assert set(answers) == {Replay(200, ANSWER, "demo-chat")}


async def test_gateways_racing_for_a_new_or_a_dead_key_have_one_winner(
        engines: list[AsyncEngine], clock: Clock) -> None:
    gateways = [service(engines[i % 2], clock, lease_s=30) for i in range(10)]

    async def race() -> list[Claim]:
        async def one(svc: IdempotencyService) -> Claim | None:
            try:
                return await claim(svc)
            except IdempotencyInProgress:
                return None
        return [c for c in await asyncio.gather(*(one(g) for g in gateways)) if c]

    [first] = await race()
    clock.advance(31)  # its gateway died: the others race to take the key over
    [second] = await race()
    assert second.owner != first.owner
    assert not await first.complete(200, ANSWER, "demo-chat")
    assert await second.complete(200, ANSWER, "demo-chat")


async def test_a_duplicate_on_another_gateway_polls_until_the_first_is_done(
        engines: list[AsyncEngine]) -> None:
    first, second = service(engines[0]), service(engines[1], poll_s=0.05)
    held = await claim(first)
    with pytest.raises(IdempotencyInProgress) as busy:
        await second.begin("acme", KEY, BODY, wait_s=0.2)
    assert busy.value.status == 409 and busy.value.code == "idempotency_in_progress"
    assert busy.value.headers["Retry-After"] == "1"
    waiting = asyncio.create_task(second.begin("acme", KEY, BODY, wait_s=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await held.complete(200, ANSWER, "demo-chat")
    assert await asyncio.wait_for(waiting, 5) == Replay(200, ANSWER, "demo-chat")


async def test_a_released_key_lets_the_next_duplicate_run(engines: list[AsyncEngine]) -> None:
    svc, other = service(engines[0]), service(engines[1], poll_s=0.05)
    held = await claim(svc)
    here = asyncio.create_task(svc.begin("acme", KEY, BODY, wait_s=10))
    await asyncio.sleep(0.1)
    assert not here.done()
    await held.release()
    retry = await asyncio.wait_for(here, 5)
    assert isinstance(retry, Claim)  # the failed request's retry runs
    there = asyncio.create_task(other.begin("acme", KEY, BODY, wait_s=10))
    async with retry:  # leaving the block unanswered releases the key
        await asyncio.sleep(0.1)
    again = await asyncio.wait_for(there, 5)
    assert isinstance(again, Claim)
    await again.release()
    assert await rows(engines[0]) == []


async def test_a_dead_gateways_claim_is_taken_over_once_its_lease_expires(
        engines: list[AsyncEngine], clock: Clock) -> None:
    dead = service(engines[0], clock, lease_s=30)
    live = service(engines[1], clock, lease_s=30)
    stale = await claim(dead)  # its gateway stops renewing: the clock jumps past the lease
    with pytest.raises(IdempotencyInProgress):
        await live.begin("acme", KEY, BODY, wait_s=0)
    clock.advance(31)
    taken = await claim(live)
    assert not await stale.complete(200, b"too late", "demo-chat")  # the claim was lost
    await taken.complete(200, ANSWER, "demo-chat")
    assert await dead.begin("acme", KEY, BODY, wait_s=0) == Replay(200, ANSWER, "demo-chat")


async def test_a_dead_claim_is_taken_over_whatever_body_it_had(
        engines: list[AsyncEngine], clock: Clock) -> None:
    svc = service(engines[0], clock, lease_s=30)
    stale = await claim(svc)
    clock.advance(31)
    other = await claim(service(engines[1], clock), body=b'{"another": "body"}')
    await other.release()
    await stale.release()  # lost: nothing to give back


async def test_a_live_claim_is_renewed_while_its_request_runs(
        engines: list[AsyncEngine]) -> None:
    svc = service(engines[0], lease_s=0.3)
    held = await claim(svc)
    await asyncio.sleep(1.0)  # three leases long
    with pytest.raises(IdempotencyInProgress):
        await service(engines[1], lease_s=0.3).begin("acme", KEY, BODY, wait_s=0)
    assert await held.complete(200, ANSWER, "demo-chat")


async def test_a_closed_gateways_claims_lapse(engines: list[AsyncEngine]) -> None:
    svc = service(engines[0], lease_s=0.3)
    held = await claim(svc)
    await svc.close()
    await asyncio.sleep(0.5)
    taken = await claim(service(engines[1], lease_s=0.3))
    assert not await held.complete(200, ANSWER, "demo-chat")
    await taken.release()


async def test_expired_keys_are_swept_and_free_again(
        engines: list[AsyncEngine], clock: Clock) -> None:
    svc = service(engines[0], clock, ttl_s=3600, sweep_batch=2)
    for i in range(5):
        await (await claim(svc, key=f"k{i}")).complete(200, ANSWER, "demo-chat")
    live = await claim(svc, key="running")
    clock.advance(3601)
    # A request still running past the expiry (its gateway renewed the lease): not swept.
    assert await svc.repo.renew("acme", live.key_hash, live.owner, clock() + timedelta(seconds=30))
    # An expired answer is not replayed, even before the sweeper came by: the key runs again,
    # with any body.
    fresh = await claim(svc, key="k0", body=b'{"new": "body"}')
    await fresh.complete(200, b"{}", "demo-chat")
    assert await svc.repo.sweep(clock(), 2) == 2  # a bounded batch
    assert await svc.sweep() == 2  # the rest; the live claim and the fresh answer stay
    assert sorted(r["state"] for r in await rows(engines[0])) == ["done", "pending"]
    clock.advance(3601 + 30)  # the live claim's lease has lapsed too
    assert await svc.sweep() == 2
    assert await rows(engines[0]) == []
    assert not await live.complete(200, ANSWER, "demo-chat")


async def test_the_sweeper_loop_deletes_expired_keys(
        engines: list[AsyncEngine], clock: Clock) -> None:
    svc = service(engines[0], clock, ttl_s=60)
    await (await claim(svc)).complete(200, ANSWER, "demo-chat")
    clock.advance(61)
    sweeper = asyncio.create_task(svc.keep_swept(0.05))
    try:
        for _ in range(100):
            if not await rows(engines[0]):
                break
            await asyncio.sleep(0.05)
        assert await rows(engines[0]) == []
    finally:
        # As the gateway's lifespan does: cancelled and awaited before the database closes (a
        # task cancelled in the middle of a query and left behind hangs the loop's shutdown).
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


async def test_an_answer_too_large_to_keep_is_neither_replayed_nor_run_again(
        engines: list[AsyncEngine]) -> None:
    svc = service(engines[0], max_answer_bytes=len(ANSWER) - 1)
    held = await claim(svc)
    assert await held.complete(200, ANSWER, "demo-chat")
    [row] = await rows(engines[0])
    assert row["state"] == "done" and row["answer"] is None
    with pytest.raises(IdempotencyAnswerNotKept) as err:
        await service(engines[1]).begin("acme", KEY, BODY, wait_s=0)
    assert (err.value.status, err.value.code) == (422, "idempotency_answer_not_kept")
    assert "too large to keep" in err.value.message


async def test_the_row_holds_neither_the_key_the_body_nor_the_answer(
        engines: list[AsyncEngine]) -> None:
    await (await claim(service(engines[0]))).complete(200, ANSWER, "demo-chat")
    [row] = await rows(engines[0])
    stored = repr(row).encode() + bytes(row["answer"])
    for secret in (KEY.encode(), b"SECRET-OUTPUT", b"Hello",
                   hashlib.sha256(KEY.encode()).hexdigest().encode(),
                   hashlib.sha256(BODY).hexdigest().encode()):
        assert secret not in stored
    assert len(row["key_hash"]) == len(row["body_hash"]) == 64


async def test_a_stored_answer_cannot_be_altered_or_moved(engines: list[AsyncEngine]) -> None:
    svc = service(engines[0])
    await (await claim(svc)).complete(200, ANSWER, "demo-chat")
    async with engines[0].begin() as conn:
        await conn.execute(update(idempotency_keys).values(status=201))
    with pytest.raises(IdempotencyAnswerNotKept):
        await svc.begin("acme", KEY, BODY, wait_s=0)
    # Another pepper neither finds the key nor could read its answer.
    other = IdempotencyService(IdempotencyRepository(engines[1]), b"q" * 32)
    fresh = await other.begin("acme", KEY, BODY, wait_s=0)
    assert isinstance(fresh, Claim)
    await fresh.release()


@pytest.mark.parametrize("key", ["", "k" * 256, "ключ", "a\nb", "tab\there"])
async def test_a_key_that_is_not_printable_ascii_is_refused(
        engines: list[AsyncEngine], key: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await service(engines[0]).begin("acme", key, BODY, wait_s=0)
    assert (err.value.status, err.value.param) == (400, "Idempotency-Key")
    assert not key or key not in err.value.message
    assert await rows(engines[0]) == []
