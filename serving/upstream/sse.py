"""Reading usage out of an OpenAI-style SSE stream while relaying it.

The gateway asks the engine for ``stream_options.include_usage`` and ``continuous_usage_stats``
on every stream, so every event carries the token counts so far: a stream the client abandons
is still charged exactly what the engine had generated. Events are forwarded as soon as they are
complete. What the client did not ask for is taken out on the way: the usage-only last event
without ``include_usage``; the per-event usage without ``continuous_usage_stats`` (``null`` when
the client asked for ``include_usage``, as OpenAI sends it, absent otherwise). Events without a
usage object pass through untouched.

With several choices (``n``, or a list of prompts), vLLM's per-event usage is that event's
choice's own: the prompt of its prompt (choice index // n) and the tokens of that choice. The
totals are the sum over prompts and choices, until the last, usage-only event gives the engine's
own totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

_SEP = b"\n\n"
_USAGE = b'"usage":{'
_USAGE_SPACED = b'"usage": {'
_MAX_PENDING = 1 << 20  # an event larger than this is relayed as it is, unparsed


class StreamAccountant:
    def __init__(self, strip_usage_event: bool, chunk_usage: str = "keep",
                 transform: Callable[[list[dict[str, Any]]], list[bool]] | None = None,
                 choices_per_prompt: int = 1) -> None:
        """``chunk_usage``: what to do with usage on content events: "keep", "null", "drop".
        ``transform``: called with the decoded data events of each read, in order (it may
        edit them; True for each it did), e.g. the output filter that redacts streamed
        text."""
        self._strip = strip_usage_event
        self._transform = transform
        self._chunk_usage = chunk_usage
        self._n = max(choices_per_prompt, 1)
        self._pending = b""
        self._prompts: dict[int, int] = {}  # prompt index -> its tokens
        self._choices: dict[int, int] = {}  # choice index -> tokens generated so far
        self._final: tuple[int | None, int | None] | None = None  # the usage-only event's
        self.first_event_at: float | None = None

    @property
    def prompt_tokens(self) -> int | None:
        if self._final is not None and self._final[0] is not None:
            return self._final[0]
        return sum(self._prompts.values()) if self._prompts else None

    @property
    def completion_tokens(self) -> int | None:
        if self._final is not None and self._final[1] is not None:
            return self._final[1]
        return sum(self._choices.values()) if self._choices else None

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
        if (self._transform is None and _USAGE not in complete
                and _USAGE_SPACED not in complete):
            return complete
        kept: list[tuple[bytes, str, dict[str, Any] | None]] = []
        for event in complete.split(_SEP):
            if event:
                kind, payload = self._account(event)
                if kind != "usage_only" or not self._strip:
                    kept.append((event, kind, payload))
        flags: Iterator[bool] | None = None
        if self._transform is not None:
            decoded = [payload for _, kind, payload in kept
                       if payload is not None and kind != "usage_only"]
            if decoded:
                flags = iter(self._transform(decoded))
        out = []
        for event, kind, payload in kept:
            if payload is not None and kind != "usage_only":
                changed = next(flags) if flags is not None else False
                if kind == "content" and self._chunk_usage != "keep":
                    if self._chunk_usage == "null":
                        payload["usage"] = None
                    else:
                        del payload["usage"]
                    changed = True
                if changed:
                    event = b"data: " + orjson.dumps(payload)
            out.append(event + _SEP)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _account(self, event: bytes) -> tuple[str, dict[str, Any] | None]:
        """Record usage from one event. Returns ("usage_only" | "content" | "other", the
        decoded payload when it is a JSON object)."""
        lines = event.split(b"\n")
        if len(lines) != 1 or not lines[0].startswith(b"data:"):
            return "other", None  # multi-line or comment events: relayed as they are
        try:
            payload = orjson.loads(lines[0][5:])
        except orjson.JSONDecodeError:
            return "other", None
        if not isinstance(payload, dict):
            return "other", None
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            return "other", payload
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        choices = payload.get("choices")
        if choices == []:
            self._final = (prompt, completion)
            return "usage_only", payload
        index = _choice_index(choices)
        if index is None:  # several choices in one event: take its usage as the totals
            self._prompts, self._choices = {0: prompt or 0}, {0: completion or 0}
        else:
            if prompt is not None:
                self._prompts[index // self._n] = prompt
            if completion is not None:
                self._choices[index] = max(completion, self._choices.get(index, 0))
        return "content", payload


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


def _choice_index(choices: object) -> int | None:
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
        return _int(choices[0].get("index", 0))
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
