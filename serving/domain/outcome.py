"""What happened to one request: gathered along the request path in a ``RequestContext``, then
frozen into an ``Outcome``. The audit record (``audit.trail``) is built from the outcome as it
stands when the last byte is about to go (it is written before the client sees the end); the
access-log line (``logs.access_fields``) and the metrics (``metrics.GatewayMetrics.observe``)
from the outcome once the request has ended (settled, or abandoned late). Each in one place.

Each fact of the context is written once, by the code that owns it:

    request_id, started, endpoint, trace_id   the request middleware
    key_id, client_id                         authentication (routes.deps, routes.oauth)
    policy, decisions                         the inference entry (routes.inference)
    model, request_text, stream               intake (pipeline.intake)
    reserved_tokens                           the inference entry, after admission
    forwarding, engine, version,
    served_model, fallback_reason,
    attempts, retried, upstream_status,
    prompt_tokens,
    completion_tokens, ttft_s,
    client_disconnected, response_text        the relay (routes.relay)
    charged_tokens                            the gate's settlement (admission.gate)
    error_code                                the one error mapping (routes.errors)

Holds identifiers and counts, never a key. ``request_text`` and ``response_text`` hold text only
for the audit record's content, per the client's policy; the access log and the metrics never
read them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from serving.domain.endpoints import INFERENCE
from serving.domain.policy import AuditContent, Policy

JsonDict = dict[str, object]


@dataclass(slots=True)
class Decisions:
    """What the guards decided for one request; recorded in its audit record."""

    pii_input: Counter[str] = field(default_factory=Counter)
    pii_input_action: str | None = None
    pii_output: Counter[str] = field(default_factory=Counter)
    pii_output_action: str | None = None
    injection: JsonDict | None = None
    tools: JsonDict | None = None
    caps: list[dict[str, str]] = field(default_factory=list)
    blocked: str | None = None  # which guard refused the request

    def as_dict(self) -> JsonDict:
        out: JsonDict = {}
        if self.pii_input:
            out["pii_input"] = {"action": self.pii_input_action, "types": dict(self.pii_input)}
        if self.pii_output:
            out["pii_output"] = {"action": self.pii_output_action,
                                 "types": dict(self.pii_output)}
        if self.injection is not None:
            out["injection"] = self.injection
        if self.tools is not None:
            out["tools"] = self.tools
        if self.caps:
            out["caps"] = self.caps
        if self.blocked is not None:
            out["blocked"] = self.blocked
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request, once answered. Immutable: built once by ``RequestContext.finish``."""

    request_id: str
    endpoint: str
    status: int
    duration_s: float
    wall_time: float  # seconds since the epoch when the answer ended
    trace_id: str | None = None
    key_id: str | None = None
    client_id: str | None = None
    model: str | None = None
    engine: str | None = None
    version: str | None = None
    served_model: str | None = None
    fallback_reason: str | None = None
    attempts: int = 0
    retried: tuple[str, ...] = ()
    idempotent_replay: bool = False
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reserved_tokens: int | None = None
    charged_tokens: int | None = None
    ttft_s: float | None = None
    error_code: str | None = None
    client_disconnected: bool = False
    decisions: JsonDict = field(default_factory=dict)
    audit_content: AuditContent = "none"  # what the audit record keeps of the text
    request_text: str | None = None
    response_text: str | None = None

    @property
    def model_label(self) -> str:
        """The model as a metric label: a manifest name, ``unknown`` for an inference request
        that named none we serve, empty for the other endpoints."""
        if self.model is not None:
            return self.model
        return "unknown" if self.endpoint in INFERENCE else ""


@dataclass(slots=True)
class RequestContext:
    """The facts of one request as they are learnt; see the module's table for who writes
    each."""

    request_id: str
    started: float  # time.perf_counter() when the request arrived
    endpoint: str = "other"
    trace_id: str | None = None
    key_id: str | None = None
    client_id: str | None = None
    policy: Policy | None = None
    decisions: Decisions | None = None
    model: str | None = None  # a manifest name, never an arbitrary client string
    stream: bool = False
    request_text: str | None = None
    reserved_tokens: int | None = None
    forwarding: bool = False  # the request was handed to an engine
    engine: str | None = None  # the replica that served the request
    version: str | None = None  # the model version that served the request
    served_model: str | None = None  # set when a fallback model answered instead of ``model``
    fallback_reason: str | None = None  # why: every replica of ``model`` was out
    attempts: int = 0  # upstream attempts made
    retried: list[str] = field(default_factory=list)  # each failed attempt's outcome
    idempotent_replay: bool = False  # answered from an earlier request's stored answer
    upstream_status: int | None = None  # the engine's HTTP status, once it answered
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    client_disconnected: bool = False
    response_text: str | None = None
    charged_tokens: int | None = None
    error_code: str | None = None

    def finish(self, status: int) -> Outcome:
        """Freeze what is known now into the request's outcome."""
        policy = self.policy
        return Outcome(
            request_id=self.request_id, endpoint=self.endpoint, status=status,
            duration_s=time.perf_counter() - self.started, wall_time=time.time(),
            trace_id=self.trace_id, key_id=self.key_id, client_id=self.client_id,
            model=self.model, engine=self.engine, version=self.version,
            served_model=self.served_model, fallback_reason=self.fallback_reason,
            attempts=self.attempts, retried=tuple(self.retried),
            idempotent_replay=self.idempotent_replay, stream=self.stream,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            reserved_tokens=self.reserved_tokens, charged_tokens=self.charged_tokens,
            ttft_s=self.ttft_s, error_code=self.error_code,
            client_disconnected=self.client_disconnected,
            decisions=self.decisions.as_dict() if self.decisions is not None else {},
            audit_content=policy.audit.content if policy is not None else "none",
            request_text=self.request_text, response_text=self.response_text)
