"""JSON logs, one object per line, with the request id on every line logged during a request.

Only fields put in ``extra`` by our own code are written, and the formatter never writes the
arguments of a log call: a key or a prompt cannot slip in through a format string.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from typing import Any

import orjson

from serving.domain.endpoints import OTHER
from serving.domain.outcome import Outcome

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "enclave_request_id", default=None)

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
_REDACTED_NAMES = ("authorization", "api_key", "key", "token", "secret", "password", "pepper",
                   "prompt", "messages", "input", "content")


_ts_cache: tuple[int, str] = (-1, "")


def _timestamp(created: float, msecs: float) -> str:
    global _ts_cache
    second = int(created)
    cache = _ts_cache  # read once: other threads (the audit writer) update it too
    if cache[0] != second:
        cache = _ts_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cache[1]}.{int(msecs):03d}Z"


def iso_timestamp(ts: float) -> str:
    """UTC to the millisecond (``2026-12-06T02:45:19.049Z``), the second's text cached."""
    return _timestamp(ts, (ts - int(ts)) * 1000)


def _entry(ts: str, level: str, logger: str, msg: str) -> dict[str, Any]:
    """The head of every line, with the request id when logged while serving a request."""
    entry: dict[str, Any] = {"ts": ts, "level": level, "logger": logger, "msg": msg}
    request_id = request_id_var.get()
    if request_id is not None:
        entry["request_id"] = request_id
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(_timestamp(record.created, record.msecs), record.levelname.lower(),
                       record.name, _message(record))
        for name, value in record.__dict__.items():
            if name in _STANDARD or name.startswith("_") or name == "color_message":
                continue
            if name.lower() in _REDACTED_NAMES:
                value = "[redacted]"
            entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages may quote request content.
            entry["exc_type"] = record.exc_info[0].__name__
            tb = record.exc_info[2]
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                code = tb.tb_frame.f_code
                entry["exc_at"] = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
        return orjson.dumps(entry, default=str).decode()


def _message(record: logging.LogRecord) -> str:
    # Our own loggers never pass arguments; uvicorn's startup lines do (ports, pids).
    if record.name.startswith("uvicorn") and record.args:
        return record.getMessage()
    return record.msg if isinstance(record.msg, str) else type(record.msg).__name__


class BufferedHandler(logging.Handler):
    """Writes formatted lines in batches: one write per ``max_lines`` lines or ``interval_s``.

    A write per log line is a system call per request, which costs the gateway a quarter of
    its throughput (measured). Lines are flushed by a background thread at least every
    ``interval_s``, at once for warnings and errors, and at exit; a process killed with SIGKILL
    can lose at most the last ``interval_s`` of lines.
    """

    def __init__(self, fd: int = 2, max_lines: int = 256, interval_s: float = 0.2) -> None:
        super().__init__()
        self._fd = fd
        self._max = max_lines
        self._pending: list[str] = []
        self._lock_buf = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_periodically, args=(interval_s,),
                                        name="log-flush", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)
            return
        self.append(line, record.levelno)

    def append(self, line: str, levelno: int = logging.INFO) -> None:
        with self._lock_buf:
            self._pending.append(line)
            full = len(self._pending) >= self._max
        if full or levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self._lock_buf:
            lines, self._pending = self._pending, []
        if lines:
            data = ("\n".join(lines) + "\n").encode()
            with contextlib.suppress(OSError):
                while data:
                    written = os.write(self._fd, data)
                    data = data[written:]

    def _flush_periodically(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


_fast: BufferedHandler | None = None
_access_logger = logging.getLogger("enclave.access")


_ACCESS_FIELDS = ("key_id", "client_id", "model", "served_model", "fallback_reason", "engine",
                  "prompt_tokens", "completion_tokens", "reserved_tokens", "charged_tokens",
                  "error_code")


def access_fields(outcome: Outcome, method: str, path: str) -> dict[str, Any]:
    """The access-log line of one request, from its outcome: identifiers and counts, never
    request text."""
    fields: dict[str, Any] = {
        "method": method,
        "path": path if outcome.endpoint != OTHER else "(unrouted)",
        "endpoint": outcome.endpoint,
        "status": outcome.status,
        "duration_ms": round(outcome.duration_s * 1000, 2),
    }
    for name in _ACCESS_FIELDS:
        value = getattr(outcome, name)
        if value is not None:
            fields[name] = value
    if outcome.stream:
        fields["stream"] = True
    if outcome.ttft_s is not None:
        fields["ttft_ms"] = round(outcome.ttft_s * 1000, 2)
    if outcome.client_disconnected:
        fields["client_disconnected"] = True
    if outcome.attempts > 1:
        fields["attempts"] = outcome.attempts
        fields["retried"] = list(outcome.retried)
    if outcome.idempotent_replay:
        fields["idempotent_replay"] = True
    return fields


def access(fields: dict[str, Any]) -> None:
    """The per-request line. Once ``configure`` ran and nothing else listens to the access
    logger, the line is built and queued directly: a LogRecord and its handler chain cost a
    quarter of the gateway's throughput (measured). Same JSON as the formatter writes."""
    if _fast is not None and _only_fast_listens():
        entry = _entry(_now(), "info", "enclave.access", "request")
        entry.update(fields)
        _fast.append(orjson.dumps(entry, default=str).decode())
    else:
        _access_logger.info("request", extra=fields)


def _only_fast_listens() -> bool:
    """True when the buffered handler is the only one the access line would reach."""
    logger: logging.Logger | None = _access_logger
    while logger is not None:
        for handler in logger.handlers:
            if handler is not _fast:
                return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def _now() -> str:
    now = time.time()
    return _timestamp(now, (now - int(now)) * 1000)


def configure(level: str = "INFO") -> None:
    # A log call on the hot path should not walk the stack or look up thread and process
    # names: none of them is written.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # skips findCaller()
    global _fast
    handler = BufferedHandler(sys.stderr.fileno())
    handler.setFormatter(JsonFormatter())
    _fast = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours, without the request id.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Alembic narrates every migration step with %-style arguments we never write; the
    # gateway logs the revision change itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
