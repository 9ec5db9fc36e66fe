"""Reading usage out of an OpenAI-style SSE stream while relaying it untouched.

The gateway asks the engine for ``stream_options.include_usage`` on every stream, so the last
event carries the token counts. Events are forwarded as soon as they are complete; only an event
that carries a usage object is parsed, and the usage-only event is dropped when the client did
not ask for it. Nothing else is decoded or re-encoded.
"""

from __future__ import annotations

import time

import orjson

_SEP = b"\n\n"
_USAGE = b'"usage":{'
_USAGE_SPACED = b'"usage": {'
_MAX_PENDING = 1 << 20  # an event larger than this is relayed as it is, unparsed


class StreamAccountant:
    def __init__(self, strip_usage_event: bool) -> None:
        self._strip = strip_usage_event
        self._pending = b""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.first_event_at: float | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from the engine; return the bytes to send to the client now."""
        if self.first_event_at is None and chunk:
            self.first_event_at = time.perf_counter()
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(_SEP)
        if end < 0:
            if len(data) > _MAX_PENDING:
                self._pending = b""
                return data
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2:]
        if _USAGE not in complete and _USAGE_SPACED not in complete:
            return complete
        out = []
        for event in complete.split(_SEP):
            if not event:
                continue
            if self._account(event) and self._strip:
                continue
            out.append(event + _SEP)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _account(self, event: bytes) -> bool:
        """Record usage from one event; True when it is the usage-only event (no choices)."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                payload = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(payload, dict):
                return False
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens = _int(usage.get("prompt_tokens"))
                self.completion_tokens = _int(usage.get("completion_tokens"))
                return payload.get("choices") == []
        return False


def usage_from_body(body: bytes) -> tuple[int | None, int | None]:
    """Token counts from a complete (non-streamed) JSON response, or (None, None)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None, None
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
