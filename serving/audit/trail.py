"""The audit trail's writer: one record per inference request, written off the event loop.

The request's last byte waits until its record is in the kernel (``os.write`` on the trail's
segment returned): a gateway killed with SIGKILL loses no record of a request whose client saw
it complete. A power loss can lose what was not yet fsynced: at most ``audit_fsync_interval_s``
(default 1 s; 0 fsyncs every batch before its requests end). A writer thread takes batches
from a bounded queue (back-pressure: a full queue makes new records wait), encrypts content
(AES-256-GCM), and appends to the hash chain, which signs a checkpoint every
``audit_checkpoint_every`` records or ``audit_checkpoint_interval_s``.

If the trail cannot be written, the batch is kept and retried, the gateway reports itself
not ready and refuses new inference requests (503 ``audit_unavailable``) until a write
succeeds: nothing is served unaudited.

Never logs a record's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from serving.domain.endpoints import INFERENCE
from serving.domain.outcome import Outcome
from serving.logs import iso_timestamp
from serving.metrics import GatewayMetrics
from serving.settings import Settings
from serving.storage.audit_chain import AuditLog
from serving.storage.audit_crypto import (
    ContentKeyring,
    create_content_key,
    load_or_create_signing_key,
)

log = logging.getLogger("enclave.audit")
AUDITED = INFERENCE
_RETRY_S = 1.0
_PURGE_EVERY_S = 3600.0


def build_record(outcome: Outcome) -> dict[str, Any]:
    """The record of one request: identifiers, counts and decisions; content per policy."""
    o = outcome
    record: dict[str, Any] = {
        "ts": iso_timestamp(o.wall_time),
        "request_id": o.request_id,
        "trace_id": o.trace_id,
        "client": o.client_id,
        "key_id": o.key_id,
        "endpoint": o.endpoint,
        "model": o.model,
        "version": o.version,
        "engine": o.engine,
        "status": o.status,
        "error_code": o.error_code,
        "stream": o.stream,
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "reserved_tokens": o.reserved_tokens,
        "charged_tokens": o.charged_tokens,
        "latency_ms": round(o.duration_s * 1000, 2),
        "ttft_ms": round(o.ttft_s * 1000, 2) if o.ttft_s is not None else None,
        "client_disconnected": o.client_disconnected,
    }
    if o.served_model is not None:  # a fallback answered: which, and why
        record["served_model"] = o.served_model
        record["fallback_reason"] = o.fallback_reason
    if o.attempts > 1:
        record["attempts"] = o.attempts
        record["retried"] = list(o.retried)
    if o.idempotent_replay:
        record["idempotent_replay"] = True
    if o.decisions:
        record["decisions"] = o.decisions
    if o.audit_content != "none" and o.request_text is not None:
        # The writer thread encrypts "encrypted" content before it reaches the file.
        record["content"] = {"mode": o.audit_content, "request": o.request_text,
                             "response": o.response_text or ""}
    return record


class AuditTrail:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._log: AuditLog | None = None
        self._keyring: ContentKeyring | None = None
        self._pending: deque[tuple[dict[str, Any], asyncio.Future[None] | None]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._space = asyncio.Event()
        self._max = settings.audit_queue_size
        self.healthy = True
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        s = self._settings
        keys_dir = s.resolved_audit_keys_dir
        if not any(keys_dir.glob("*.key")):
            key_id = create_content_key(keys_dir)
            log.info("audit content key created", extra={"key_id": key_id,
                                                         "directory": str(keys_dir)})
        self._keyring = ContentKeyring(keys_dir, s.audit_key_id)
        signing = load_or_create_signing_key(s.resolved_audit_signing_key_file)
        self._log = AuditLog(s.audit_chain_dir, signing,
                             checkpoint_every=s.audit_checkpoint_every,
                             checkpoint_interval_s=s.audit_checkpoint_interval_s,
                             segment_bytes=s.audit_segment_bytes,
                             fsync_interval_s=s.audit_fsync_interval_s)
        self._log.open()
        if self._log.recovered_torn_bytes:
            log.warning("audit trail: a torn last record (a crash mid-write) was cut off",
                        extra={"bytes": self._log.recovered_torn_bytes})
        self._loop = asyncio.get_running_loop()
        self._space.set()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        log.info("audit trail open", extra={"directory": str(s.audit_chain_dir),
                                            "content_key": self._keyring.current_id})

    async def close(self) -> None:
        """Writes everything queued, signs a last checkpoint, fsyncs."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._log is not None:
            self._log.close()

    # -- the request side ------------------------------------------------------------------

    async def record(self, record: dict[str, Any], wait: bool = True) -> None:
        """Queue one record; with ``wait``, return once it is written (raises ``OSError``
        when it could not be, for now: it stays queued and is retried)."""
        while len(self._pending) >= self._max:
            self._space.clear()
            await self._space.wait()
        future = self._loop.create_future() if wait and self._loop is not None else None
        with self._cond:
            self._pending.append((record, future))
            self._cond.notify()
        if future is not None:
            await future

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        assert self._log is not None
        retry: list[tuple[dict[str, Any], asyncio.Future[None] | None]] = []
        last_purge = 0.0
        tick = min(self._settings.audit_fsync_interval_s or 1.0, 1.0)
        while True:
            with self._cond:
                if not self._pending and not self._stop and not retry:
                    self._cond.wait(tick)
                batch = retry + list(self._pending)
                self._pending.clear()
                stopping = self._stop
            retry = []
            if batch:
                retry = self._write(batch)
            if not retry:
                with contextlib.suppress(OSError):
                    self._log.maybe_sync()
            if self._settings.audit_retention_days is not None:
                now = time.monotonic()
                if now - last_purge >= _PURGE_EVERY_S:
                    last_purge = now
                    self._purge()
            if retry:
                if stopping:
                    log.error("audit records could not be written at shutdown",
                              extra={"records": len(retry)})
                    return
                time.sleep(_RETRY_S)
            elif stopping and not self._pending:
                return

    def _write(self, batch: list[tuple[dict[str, Any], asyncio.Future[None] | None]]
               ) -> list[tuple[dict[str, Any], asyncio.Future[None] | None]]:
        assert self._log is not None and self._loop is not None
        records = [self._seal(record) for record, _ in batch]
        try:
            self._log.append(records)
        except Exception as exc:
            self._metrics.audit_failures.inc()
            self.last_error = type(exc).__name__
            if self.healthy:
                log.error("audit trail cannot be written; inference is refused until it can",
                          extra={"error": type(exc).__name__, "records": len(records)})
            self.healthy = False
            # The requests go on (their answer is sent); their records stay queued here.
            self._loop.call_soon_threadsafe(self._resolve, [f for _, f in batch], exc)
            return [(record, None) for record in records]
        if not self.healthy:
            log.info("audit trail writable again", extra={"records": len(records)})
        self.healthy = True
        self._metrics.audit_records.inc(len(records))
        self._loop.call_soon_threadsafe(self._resolve, [f for _, f in batch], None)
        return []

    def _seal(self, record: dict[str, Any]) -> dict[str, Any]:
        content = record.get("content")
        if isinstance(content, dict) and content.get("mode") == "encrypted" \
                and "request" in content:
            assert self._keyring is not None
            plaintext = orjson.dumps({"request": content["request"],
                                      "response": content["response"]})
            sealed = self._keyring.encrypt(plaintext, str(record["request_id"]).encode())
            record["content"] = {"mode": "encrypted", **sealed}
        return record

    def _resolve(self, futures: list[asyncio.Future[None] | None],
                 error: BaseException | None) -> None:
        for future in futures:
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(OSError(f"audit write failed: {type(error).__name__}"))
        self._metrics.audit_queue.set(len(self._pending))
        if len(self._pending) < self._max:
            self._space.set()

    def _purge(self) -> None:
        assert self._log is not None
        days = self._settings.audit_retention_days
        assert days is not None
        try:
            removed = self._log.purge(datetime.now(UTC) - timedelta(days=days))
        except OSError as exc:
            log.warning("audit retention purge failed", extra={"error": type(exc).__name__})
            return
        if removed:
            log.info("audit segments past retention purged", extra={"segments": removed})
