"""Token budgets with reservation, and usage accounting, through a group-committing writer.

Before a request is forwarded, the most it can cost (its prompt, bounded by its size in bytes,
plus ``n * max_tokens``) is reserved against the client's day and month budgets; the answer's
real usage settles the reservation (an aborted stream is charged what was generated, an aborted
non-streamed request its whole reservation: the engine may finish it anyway); a failure before
the engine answered releases it. Reservations left by a gateway that died expire after
``reservation_ttl_s`` and are released by a sweeper.

Operations from concurrent requests are queued and written in one transaction per batch (group
commit): a reservation waits for its batch's commit, a settlement does not wait at all. Queued
settlements are written before the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from serving.storage.ledger import LedgerRepository, Op, Reserve, Settle
from serving.storage.policies import Budgets
from serving.storage.times import day_key, month_key

log = logging.getLogger("enclave.budgets")
_MAX_BATCH = 512


class QuotaExceeded(Exception):
    def __init__(self, period: str, retry_after_s: int) -> None:
        super().__init__(period)
        self.period = period
        self.retry_after_s = retry_after_s


class LedgerUnavailable(Exception):
    pass


@dataclass(slots=True)
class Reservation:
    id: str
    client_id: str
    tokens: int
    day: str
    month: str


def seconds_until_period_end(period: str, now: datetime) -> int:
    if period == "day":
        end = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (first + timedelta(days=32)).replace(day=1)
    return max(1, int((end - now).total_seconds()) + 1)


class BudgetLedger:
    def __init__(self, repo: LedgerRepository, reservation_ttl_s: float) -> None:
        self.repo = repo
        self._ttl = timedelta(seconds=reservation_ttl_s)
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[str | None] | None]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        self.lost_settlements = 0

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        await self._queue.join()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def reserve(self, client_id: str, budgets: Budgets, tokens: int) -> Reservation:
        now = datetime.now(UTC)
        op = Reserve(id=secrets.token_hex(12), client_id=client_id, tokens=tokens,
                     day=day_key(now), month=month_key(now), day_limit=budgets.tokens_per_day,
                     month_limit=budgets.tokens_per_month, expires_at=now + self._ttl)
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, done))
        try:
            # Shielded: the batch is written either way, and a caller that goes away while
            # waiting must release what was reserved for it.
            refused = await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(lambda f: self._release_abandoned(f, op))
            raise
        if refused is not None:
            raise QuotaExceeded(refused, seconds_until_period_end(refused, now))
        return Reservation(op.id, client_id, tokens, op.day, op.month)

    def _release_abandoned(self, done: asyncio.Future[str | None], op: Reserve) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is None:
            self._queue.put_nowait((Settle(op.id, op.client_id, "", op.day, op.month, 0, 0, 0),
                                    None))

    def settle(self, reservation: Reservation | None, client_id: str, model: str,
               prompt_tokens: int, completion_tokens: int, charge: int) -> None:
        """Queue the settlement (or the usage of an unbudgeted request); returns at once."""
        now = datetime.now(UTC)
        day = reservation.day if reservation is not None else day_key(now)
        month = reservation.month if reservation is not None else month_key(now)
        self._queue.put_nowait((Settle(
            reservation.id if reservation is not None else None, client_id, model, day, month,
            prompt_tokens, completion_tokens, charge), None))

    async def sweep(self) -> int:
        released = await self.repo.sweep(datetime.now(UTC))
        if released:
            log.warning("released reservations left open by a stopped gateway",
                        extra={"reservations": released})
        return released

    async def keep_swept(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the next round tries again
                log.warning("reservation sweep failed", exc_info=True)
            await asyncio.sleep(interval_s)

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[Op, asyncio.Future[str | None] | None]]) -> None:
        ops = [op for op, _ in batch]
        for attempt in range(3):
            try:
                results = await self.repo.apply(ops)
                break
            except Exception as exc:  # retried, then reported per request
                if attempt < 2:
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                log.error("ledger write failed", extra={"ops": len(ops),
                                                        "reason": type(exc).__name__})
                for op, done in batch:
                    if done is not None and not done.done():
                        done.set_exception(LedgerUnavailable())
                    elif isinstance(op, Settle):
                        self.lost_settlements += 1
                return
        self.batches += 1
        for (_, done), result in zip(batch, results, strict=True):
            if done is not None and not done.done():
                done.set_result(result)
