"""Per-request facts gathered along the way, read by the access log and the metrics at the end.

Holds identifiers and counts, never a key. ``request_text`` and the output filter hold text
only for the audit record's content, per the client's policy; the access log and the metrics
read named fields and never those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    version: str | None = None  # the model version that served the request
    trace_id: str | None = None  # from the W3C traceparent header
    policy: Any = None  # the client's policy in force for this request
    decisions: Any = None  # protection.Decisions: what the guards decided
    output: Any = None  # protection.OutputFilter, when the answer is filtered or kept
    request_text: str | None = None  # for the audit record's content only; never logged
    reserved_tokens: int | None = None  # the cost bound held against the client's budget
    charged_tokens: int | None = None  # what the request was charged when it ended
