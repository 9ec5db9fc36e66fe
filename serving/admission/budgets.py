"""Token budgets with reservation, and usage accounting, kept off the request's hot path.

Before a request is forwarded, the most it can cost (its prompt, bounded by its size in bytes,
plus ``n * max_tokens``) is reserved against the client's day and month budgets; the answer's
real usage settles the reservation (an aborted stream is charged what was generated, an aborted
non-streamed request its whole reservation: the engine may finish it anyway); a failure before
the engine answered releases it.

Reservations are taken from a **lease**: tokens this gateway holds in the ledger for a client
and period (see ``storage.ledger``). A request whose reservation fits in the lease is admitted
without touching the database; otherwise the lease grows by a chunk (a batched, locked,
conditional write) or, near the edge of the budget, by exactly what is missing, and the request
is refused when even that does not fit. Settlements move tokens from the lease to ``used`` and
are written within ``SETTLE_DELAY_S``, batched. A lease idle for ``LEASE_IDLE_S`` is given back,
so budgets do not stay stranded on a quiet gateway; the live gateway renews its leases, and the
leases of a gateway that died expire after ``reservation_ttl_s`` and are released by the sweeper
of any gateway. A gateway killed outright (SIGKILL) loses at most the last 50 ms of
settlements: those tokens are released uncharged when its leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from serving.domain.policy import Budgets
from serving.storage.ledger import Charge, Grant, LedgerRepository, Op, Renew, Return
from serving.storage.times import day_key, month_key

log = logging.getLogger("enclave.budgets")
_MAX_BATCH = 512
SETTLE_DELAY_S = 0.05
LEASE_IDLE_S = 1.0
# A lease grows by up to this many requests' worth at once, and never by more than this
# share of the smallest budget, so several gateways can share a budget.
_CHUNK_REQUESTS = 32
_CHUNK_SHARE = 20


class QuotaExceeded(Exception):
    def __init__(self, period: str, retry_after_s: int) -> None:
        super().__init__(period)
        self.period = period
        self.retry_after_s = retry_after_s


class LedgerUnavailable(Exception):
    pass


@dataclass(slots=True)
class Reservation:
    lease_id: str
    client_id: str
    tokens: int
    day: str
    month: str


@dataclass(slots=True)
class _Lease:
    id: str
    client_id: str
    day: str
    month: str
    granted: int = 0  # tokens this gateway holds in the ledger
    held: int = 0  # of which reserved by requests in flight
    last_used: float = 0.0


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    kind: str  # "day" | "month"
    period: str  # "2026-11-23" | "2026-11"
    limit: int | None
    used: int
    reserved: int  # held in gateways' leases


async def budget_status(repo: LedgerRepository, client_id: str,
                        budgets: Budgets | None) -> list[BudgetStatus]:
    """A client's budgets for today and this month: limit, used, held in leases."""
    now = datetime.now(UTC)
    periods = (("day", day_key(now), budgets.tokens_per_day if budgets else None),
               ("month", month_key(now), budgets.tokens_per_month if budgets else None))
    counters = await repo.counters(client_id, [p for _, p, _ in periods])
    return [BudgetStatus(kind, period, limit,
                         counters[period].used if period in counters else 0,
                         counters[period].reserved if period in counters else 0)
            for kind, period, limit in periods]


def seconds_until_period_end(period: str, now: datetime) -> int:
    if period == "day":
        end = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (first + timedelta(days=32)).replace(day=1)
    return max(1, int((end - now).total_seconds()) + 1)


def chunk_for(tokens: int, budgets: Budgets) -> int:
    limits = [x for x in (budgets.tokens_per_day, budgets.tokens_per_month) if x is not None]
    share = min(limits) // _CHUNK_SHARE if limits else tokens * _CHUNK_REQUESTS
    return max(tokens, min(share, tokens * _CHUNK_REQUESTS))


class BudgetLedger:
    def __init__(self, repo: LedgerRepository, reservation_ttl_s: float,
                 settle_delay_s: float = SETTLE_DELAY_S, lease_idle_s: float = LEASE_IDLE_S
                 ) -> None:
        self.repo = repo
        self._ttl = timedelta(seconds=reservation_ttl_s)
        self._delay = settle_delay_s
        self._idle = lease_idle_s
        self._leases: dict[tuple[str, str, str], _Lease] = {}
        self._grants: list[tuple[Grant, asyncio.Future[str | None]]] = []
        self._settles: list[Op] = []
        self._settles_since = 0.0
        self._wake = asyncio.Event()
        self._busy = False
        self._flushing = False
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def flush(self) -> None:
        """Write everything queued now (settlements included) and wait for it."""
        self._flushing = True
        try:
            while self._grants or self._settles or self._busy:
                self._wake.set()
                await asyncio.sleep(0.005)
        finally:
            self._flushing = False

    async def stop(self) -> None:
        """Give every lease back, write what is queued, then stop."""
        self.return_idle(force=True)
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def reserve(self, client_id: str, budgets: Budgets, tokens: int) -> Reservation:
        now = datetime.now(UTC)
        key = (client_id, day_key(now), month_key(now))
        while True:
            lease = self._leases.get(key)
            if lease is None:
                lease = self._leases[key] = _Lease(secrets.token_hex(12), *key)
            lease.last_used = time.monotonic()
            missing = tokens - (lease.granted - lease.held)
            if missing <= 0:
                lease.held += tokens
                return Reservation(lease.id, client_id, tokens, lease.day, lease.month)
            refused = await self._grant(lease, max(missing, chunk_for(tokens, budgets)),
                                        budgets)
            if refused is not None:
                # Near the edge: ask for exactly what is missing before refusing.
                refused = await self._grant(lease, missing, budgets)
            if refused is not None:
                raise QuotaExceeded(refused, seconds_until_period_end(refused, now))

    async def _grant(self, lease: _Lease, tokens: int, budgets: Budgets) -> str | None:
        op = Grant(lease.id, lease.client_id, lease.day, lease.month, tokens,
                   budgets.tokens_per_day, budgets.tokens_per_month,
                   datetime.now(UTC) + self._ttl)
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._grants.append((op, done))
        self._wake.set()
        # Shielded: the grant is written either way (a caller that goes away leaves it in the
        # lease, which is given back when idle).
        return await asyncio.shield(done)

    def settle(self, reservation: Reservation | None, client_id: str, model: str,
               prompt_tokens: int, completion_tokens: int, charge: int) -> None:
        """Settle a reservation (or count an unbudgeted request's usage); returns at once."""
        lease_id = None
        if reservation is None:
            now = datetime.now(UTC)
            day, month = day_key(now), month_key(now)
        else:
            day, month = reservation.day, reservation.month
            lease = self._leases.get((reservation.client_id, day, month))
            if lease is not None and lease.id == reservation.lease_id:
                lease.held = max(0, lease.held - reservation.tokens)
                lease.granted = max(0, lease.granted - charge)
                lease.last_used = time.monotonic()
                lease_id = lease.id
        if charge or model:
            self._queue_settle(Charge(lease_id, client_id, model, day, month, prompt_tokens,
                                      completion_tokens, charge))

    def return_idle(self, force: bool = False) -> int:
        """Give back leases no request holds and none used for a while (or all: ``force``)."""
        now = time.monotonic()
        today = (day_key(datetime.now(UTC)), month_key(datetime.now(UTC)))
        returned = 0
        for key, lease in list(self._leases.items()):
            stale = (lease.day, lease.month) != today
            if lease.held == 0 and (force or stale or now - lease.last_used >= self._idle):
                del self._leases[key]
                self._queue_settle(Return(lease.id))
                returned += 1
        return returned

    def renew(self) -> None:
        expires = datetime.now(UTC) + self._ttl
        for lease in self._leases.values():
            self._queue_settle(Renew(lease.id, expires))

    async def keep_leases(self, ttl_s: float) -> None:
        """Give back idle leases every second; renew the others well before they expire."""
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(min(self._idle, ttl_s / 4))
            self.return_idle()
            if time.monotonic() - last_renewal >= ttl_s / 3:
                self.renew()
                last_renewal = time.monotonic()

    def _queue_settle(self, settle: Op) -> None:
        if not self._settles:
            self._settles_since = time.monotonic()
            asyncio.get_running_loop().call_later(self._delay, self._wake.set)
        self._settles.append(settle)
        if len(self._settles) >= _MAX_BATCH:
            self._wake.set()

    async def sweep(self) -> int:
        released = await self.repo.sweep(datetime.now(UTC))
        if released:
            log.warning("released budget leases of a gateway that stopped renewing them",
                        extra={"leases": released})
        return released

    async def keep_swept(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the next round tries again
                log.warning("budget lease sweep failed", exc_info=True)
            await asyncio.sleep(interval_s)

    async def _write_loop(self) -> None:
        """Grants are written at once (a request waits for them), as many per transaction as
        are waiting; settlements wait up to ``settle_delay_s`` to share a
        transaction, off the path of the next reservation."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                grants = self._grants[:_MAX_BATCH]
                del self._grants[:len(grants)]
                wait = self._delay - (time.monotonic() - self._settles_since)
                due = bool(self._settles) and (
                    self._flushing or len(self._settles) >= _MAX_BATCH or wait <= 0)
                settles: list[Op] = []
                if due:
                    settles, self._settles = self._settles, []
                if not grants and not settles:
                    if self._settles:
                        # Woken early (a timer may fire a little before its time): come back.
                        asyncio.get_running_loop().call_later(wait, self._wake.set)
                    break
                self._busy = True
                try:
                    await self._write(grants, settles)
                finally:
                    self._busy = False

    async def _write(self, grants: list[tuple[Grant, asyncio.Future[str | None]]],
                     settles: list[Op]) -> None:
        ops: list[Op] = [op for op, _ in grants]
        ops += settles
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
                for _, done in grants:
                    if not done.done():
                        done.set_exception(LedgerUnavailable())
                return
        self.batches += 1
        for (op, done), result in zip(grants, results, strict=False):
            if result is None:
                lease = self._leases.get((op.client_id, op.day, op.month))
                if lease is not None and lease.id == op.lease_id:
                    lease.granted += op.tokens
                else:  # the lease was given back meanwhile: give this grant back too
                    self._queue_settle(Return(op.lease_id))
            if not done.done():
                done.set_result(result)
