"""Which version a request belongs to while several take traffic (a rollout's canary): a
64-bit hash of the client and the conversation (``ModelRoute.sticky`` reads two independent
parts of it), so that every request of one conversation goes to the same version, in every
gateway process, and raising the canary's weight only moves conversations from the stable
versions to the canary, never back, never between stable versions.

The conversation is its first user message (a chat's later turns repeat it), a completion's
prompt, an embedding's input: what stays the same from one turn to the next.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from serving.contract import ChatRequest, CompletionRequest, Request

BUCKETS = 10_000


def bucket(client_id: str | None, request: Request) -> int:
    """The conversation's 64-bit hash; ``% BUCKETS`` is its bucket (``ModelRoute.sticky`` uses
    the next digits for a second, independent choice)."""
    return bucket_of(client_id, _conversation(request))


def bucket_of(client_id: str | None, conversation: bytes) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update((client_id or "").encode())
    digest.update(b"\0")
    digest.update(conversation)
    return int.from_bytes(digest.digest(), "big")


def _conversation(request: Request) -> bytes:
    if isinstance(request, ChatRequest):
        first: Any = next((m for m in request.messages if m.role == "user"), request.messages[0])
        return _canonical(first.content)
    if isinstance(request, CompletionRequest):
        return _canonical(request.prompt)
    return _canonical(request.input)


def _canonical(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_none=True) if hasattr(v, "model_dump")
                 else v for v in value]
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
