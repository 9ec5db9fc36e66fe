"""Per-request facts gathered along the way, read by the access log and the metrics at the end.

Holds identifiers and counts only: never a key, a prompt or a completion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float
    endpoint: str = "other"
    key_id: str | None = None
    client_id: str | None = None
    model: str | None = None  # a manifest name, never an arbitrary client string
    engine: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    error_code: str | None = None
    client_disconnected: bool = False
    forwarding: bool = False  # the request was handed to an engine
    upstream_status: int | None = None  # the engine's HTTP status, once it answered
