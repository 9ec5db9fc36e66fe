"""JSON logs, one object per line, with the request id on every line logged during a request.

Only fields put in ``extra`` by our own code are written, and the formatter never writes the
arguments of a log call: a key or a prompt cannot slip in through a format string.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "enclave_request_id", default=None)

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
_REDACTED_NAMES = ("authorization", "api_key", "key", "token", "secret", "password", "pepper",
                   "prompt", "messages", "input", "content")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
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


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours, without the request id.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
