"""Idempotency keys for non-streamed requests: the same ``Idempotency-Key`` and body from the
same client, within ``ttl_s`` of the first request, get the stored answer back without running
(or charging) the request again.

``begin`` ends in one of these ways:

- a ``Claim``: this request runs. The caller then calls ``Claim.complete`` with a 200 answer, or
  ``Claim.release`` on any failure, so the client can retry with the same key (``async with
  claim:`` releases whatever was not completed);
- a ``Replay``: a request with this key and body finished; here is its answer;
- ``IdempotencyConflict`` (422): the key was used with another body;
  ``IdempotencyAnswerNotKept`` (422): it finished, but its answer was larger than
  ``max_answer_bytes`` (or unreadable), so it is neither replayed nor run again;
- ``IdempotencyInProgress`` (409 + Retry-After): a request with this key and body is still
  running and did not finish within ``wait_s``;
- ``StoreUnavailable`` (503): the state database cannot be read.

A released claim, a dead one (below) and an expired key are free for any body. Failing to
store an answer or to release a claim is logged, not raised: the client has its answer, and the
claim lapses after ``lease_s`` (a duplicate then runs again).

Duplicates wait for the first. In one process, they wait on the first's in-process slot (no
polling, and one database read for all of them); across gateways, one request per key and
process polls the row every ``poll_s``. A claim is a lease of ``lease_s`` that its gateway
renews while the request runs: the claim of a gateway that died expires and the next duplicate
takes the key over (``storage.idempotency`` makes that race-free).

What is stored: HMAC-SHA256 digests of the key and of the body (a copy of the database can
neither read a key nor confirm a guessed prompt), and the answer sealed with AES-256-GCM under
a key derived (HKDF) from the server pepper, with the client, both digests, the status and the
model as associated data, so a row cannot be moved to another key or altered. Rows expire after
``ttl_s`` (from the first request) and are deleted in batches by ``keep_swept``; ``close``
stops renewing leases at shutdown. Nothing here logs or puts in an error a key, a body or an
answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TypeVar

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from serving.errors import (
    IdempotencyAnswerNotKept,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
    StoreUnavailable,
)
from serving.storage.idempotency import IdempotencyRecord, IdempotencyRepository

log = logging.getLogger("enclave.idempotency")
HEADER = "Idempotency-Key"
_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII
_INFO = b"enclave idempotency v1"
_NONCE = 12
_RETRY_AFTER_S = 1
_SWEEP_ROUNDS = 10
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer a request with the same key and body got."""

    status: int
    body: bytes
    model: str


@dataclass(eq=False, slots=True)
class _Slot:
    """This process's request for one (client, key, body): the one claiming or polling it.
    Its duplicates wait on ``done``, then read ``replay`` or try again."""

    body_hash: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    claimed: bool = False
    replay: Replay | None = None


class Claim:
    """This request holds the key: run it, then ``complete`` or ``release`` (once; later calls
    do nothing). The lease is renewed in the background until then."""

    def __init__(self, service: IdempotencyService, client_id: str, key_hash: str, owner: str,
                 slot: _Slot) -> None:
        self._service = service
        self.client_id = client_id
        self.key_hash = key_hash
        self.owner = owner
        self._slot = slot
        self._stop = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._stop.is_set()

    async def complete(self, status: int, body: bytes, model: str) -> bool:
        """Store the answer for replay (meant for 200 answers: release on failures). An answer
        over ``max_answer_bytes`` is recorded as done but not kept. False: nothing was stored
        (the claim was lost, or the store failed); the request was answered all the same."""
        if self.finished:
            return False
        self._stop.set()
        return await self._service._complete(self, status, body, model)

    async def release(self) -> None:
        """Give the key up unanswered: the next request with it runs."""
        if self.finished:
            return
        self._stop.set()
        await self._service._release(self)

    async def __aenter__(self) -> Claim:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.release()


class IdempotencyService:
    def __init__(self, repo: IdempotencyRepository, pepper: bytes, *, ttl_s: float = 86400,
                 max_answer_bytes: int = 1 << 20, lease_s: float = 30.0, poll_s: float = 0.25,
                 sweep_batch: int = 1000,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if lease_s <= 0 or poll_s <= 0 or ttl_s <= 0:
            raise ValueError("ttl_s, lease_s and poll_s must be positive")
        self.repo = repo
        self.ttl_s = ttl_s
        self.max_answer_bytes = max_answer_bytes
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.sweep_batch = sweep_batch
        self._clock = clock
        self._digest_key = _derive(pepper, _INFO + b" digest")
        self._aead = AESGCM(_derive(pepper, _INFO))
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._renewers: set[asyncio.Task[None]] = set()

    # -- begin ------------------------------------------------------------------------------

    async def begin(self, client_id: str, key: str, body: bytes, *,
                    wait_s: float) -> Replay | Claim:
        """Claim ``key`` for this request, or the stored answer of the one that had it; wait up
        to ``wait_s`` for one still running."""
        if not _KEY_RE.fullmatch(key):
            raise InvalidRequest(f"The {HEADER} header must be 1 to 255 printable ASCII "
                                 "characters.", param=HEADER)
        key_hash = self._digest(b"key", key.encode("ascii"))
        body_hash = self._digest(b"body", body)
        # Keyed by the body too: a request with another body goes to the database, which
        # refuses it at once, rather than waiting behind this one.
        where = (client_id, key_hash, body_hash)
        deadline = time.monotonic() + wait_s
        while (slot := self._slots.get(where)) is not None:
            await self._until(slot.done, deadline)
            if slot.replay is not None:
                return slot.replay
            # Released, not kept, lost, or its holder gave up waiting: see for ourselves.
        slot = _Slot(body_hash)
        self._slots[where] = slot
        try:
            return await self._resolve(client_id, key_hash, body_hash, slot, deadline)
        finally:
            if not slot.claimed:
                self._free(where, slot)

    async def _resolve(self, client_id: str, key_hash: str, body_hash: str, slot: _Slot,
                       deadline: float) -> Replay | Claim:
        while True:
            now = self._clock()
            owner = secrets.token_hex(16)
            if await self._db(self.repo.claim(
                    client_id, key_hash, body_hash, owner, now=now,
                    lease_until=now + timedelta(seconds=self.lease_s),
                    expires_at=now + timedelta(seconds=self.ttl_s))):
                slot.claimed = True
                claim = Claim(self, client_id, key_hash, owner, slot)
                task = asyncio.create_task(self._keep_leased(claim))
                self._renewers.add(task)
                task.add_done_callback(self._renewers.discard)
                return claim
            record = await self._db(self.repo.get(client_id, key_hash))
            if record is None:
                continue  # released between the two reads: claim it
            if record.body_hash != body_hash:
                raise IdempotencyConflict()
            if record.done:
                slot.replay = self._open(record)
                return slot.replay
            left = deadline - time.monotonic()
            if left <= 0:
                raise _in_progress()
            await asyncio.sleep(min(self.poll_s, left))

    @staticmethod
    async def _until(event: asyncio.Event, deadline: float) -> None:
        left = deadline - time.monotonic()
        if event.is_set():
            return
        if left <= 0:
            raise _in_progress()
        try:
            async with asyncio.timeout(left):
                await event.wait()
        except TimeoutError:
            raise _in_progress() from None

    async def _db(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except Exception as exc:
            log.warning("idempotency store failed", extra={"error": type(exc).__name__})
            raise StoreUnavailable("The idempotency store cannot be reached; retry shortly.",
                                   _RETRY_AFTER_S) from None

    def _free(self, where: tuple[str, str, str], slot: _Slot) -> None:
        if self._slots.get(where) is slot:
            del self._slots[where]
        slot.done.set()

    # -- the claim's end --------------------------------------------------------------------

    async def _complete(self, claim: Claim, status: int, body: bytes, model: str) -> bool:
        kept = len(body) <= self.max_answer_bytes
        body_hash = claim._slot.body_hash
        sealed = (self._seal(claim.client_id, claim.key_hash, body_hash, status, model, body)
                  if kept else None)
        try:
            # Shielded: a client leaving mid-write does not abandon the answer half-kept; and
            # the slot is freed whatever happens (else duplicates here would wait forever).
            stored = await asyncio.shield(self.repo.complete(
                claim.client_id, claim.key_hash, claim.owner, status=status, answer=sealed,
                model=model))
            if not stored:
                log.warning("idempotency claim lost before its answer was stored",
                            extra={"client": claim.client_id})
            if stored and kept:
                claim._slot.replay = Replay(status, body, model)  # for duplicates waiting here
            elif stored:
                log.info("idempotency answer too large to keep", extra={
                    "client": claim.client_id, "bytes": len(body),
                    "limit": self.max_answer_bytes})
        except Exception as exc:  # the lease expires: a duplicate runs again after lease_s
            log.warning("idempotency answer not stored", extra={
                "client": claim.client_id, "error": type(exc).__name__})
            stored = False
        finally:
            self._free((claim.client_id, claim.key_hash, body_hash), claim._slot)
        return stored

    async def _release(self, claim: Claim) -> None:
        try:
            await asyncio.shield(self.repo.release(claim.client_id, claim.key_hash, claim.owner))
        except Exception as exc:  # the lease expires: the key is free again after lease_s
            log.warning("idempotency claim not released", extra={
                "client": claim.client_id, "error": type(exc).__name__})
        finally:
            self._free((claim.client_id, claim.key_hash, claim._slot.body_hash), claim._slot)

    async def _keep_leased(self, claim: Claim) -> None:
        while True:
            try:
                async with asyncio.timeout(self.lease_s / 3):
                    await claim._stop.wait()
                return
            except TimeoutError:
                pass
            try:
                held = await self.repo.renew(
                    claim.client_id, claim.key_hash, claim.owner,
                    self._clock() + timedelta(seconds=self.lease_s))
            except Exception as exc:  # the next round tries again
                log.warning("idempotency lease not renewed", extra={
                    "client": claim.client_id, "error": type(exc).__name__})
                continue
            if not held and not claim.finished:
                log.warning("idempotency claim lost while its request ran",
                            extra={"client": claim.client_id})
                return

    # -- sealing ----------------------------------------------------------------------------

    def _digest(self, kind: bytes, data: bytes) -> str:
        return hmac.new(self._digest_key, kind + b"\0" + data, hashlib.sha256).hexdigest()

    def _seal(self, client_id: str, key_hash: str, body_hash: str, status: int, model: str,
              answer: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        aad = _aad(client_id, key_hash, body_hash, status, model)
        return nonce + self._aead.encrypt(nonce, answer, aad)

    def _open(self, record: IdempotencyRecord) -> Replay:
        if record.answer is None or record.status is None:
            raise IdempotencyAnswerNotKept(
                "The request with this Idempotency-Key already ran, but its answer was too "
                "large to keep for replay; it is not run again. Use a new key to run it again.")
        model = record.model or ""
        aad = _aad(record.client_id, record.key_hash, record.body_hash, record.status, model)
        try:
            body = self._aead.decrypt(record.answer[:_NONCE], record.answer[_NONCE:], aad)
        except InvalidTag:
            log.warning("idempotency answer cannot be opened (altered, or another pepper)",
                        extra={"client": record.client_id})
            raise IdempotencyAnswerNotKept(
                "The request with this Idempotency-Key already ran, but its stored answer "
                "cannot be read; it is not run again. Use a new key to run it again.") from None
        return Replay(record.status, body, model)

    async def close(self) -> None:
        """Stop renewing leases (at shutdown, before the database closes): a claim still held
        expires after ``lease_s`` and its key is free again."""
        renewers = list(self._renewers)
        for task in renewers:
            task.cancel()
        await asyncio.gather(*renewers, return_exceptions=True)

    # -- expiry -----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired rows, ``sweep_batch`` per statement, a few batches per call."""
        total = 0
        for _ in range(_SWEEP_ROUNDS):
            gone = await self.repo.sweep(self._clock(), self.sweep_batch)
            total += gone
            if gone < self.sweep_batch:
                break
        return total

    async def keep_swept(self, interval_s: float) -> None:
        while True:
            try:
                if swept := await self.sweep():
                    log.info("idempotency keys expired", extra={"keys": swept})
            except Exception as exc:  # the next round tries again
                log.warning("idempotency sweep failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(interval_s)


def _derive(pepper: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(pepper)


def _aad(client_id: str, key_hash: str, body_hash: str, status: int, model: str) -> bytes:
    return orjson.dumps([_INFO.decode(), client_id, key_hash, body_hash, status, model])


def _in_progress() -> IdempotencyInProgress:
    return IdempotencyInProgress(
        "A request with this Idempotency-Key is still in progress; retry later.",
        _RETRY_AFTER_S)
