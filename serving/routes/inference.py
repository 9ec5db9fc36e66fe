"""The OpenAI-compatible endpoints. An inference ``POST`` arrives here from the entry
(``routes.entry``) at ``handle``, which answers every error through ``routes.errors``; the
work is ``forward``: authenticate, check the caller's scope, read a capped body, prepare it
(``pipeline.intake.prepare``: the request contract, the model, the policy's fields and caps,
every text inspected; in a worker thread when the body is large), bound its cost, take the
client's rate-limit, concurrency and budget admission, then hand a ``RelayResponse`` (which
talks to the engine) back to ``handle`` to send.

Only the JSON body names the model: query parameters and headers are never read for it.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from serving import tracing
from serving.admission import cost
from serving.admission.idempotency import HEADER, Claim, Replay
from serving.container import Services
from serving.domain.endpoints import INFERENCE_PATHS
from serving.domain.manifest import ENDPOINTS_BY_TASK
from serving.domain.outcome import Decisions
from serving.domain.policy import Policy
from serving.domain.principal import Principal
from serving.errors import (
    AuditUnavailable,
    EngineUnavailable,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
)
from serving.pipeline import intake
from serving.routes.context import context
from serving.routes.deps import authenticate, services
from serving.routes.errors import send_error
from serving.routes.relay import RelayResponse
from serving.routes.responses import JSONResponse
from serving.tracing import Span
from serving.upstream.client import Upstream
from serving.upstream.pool import EnginePool, ModelRoute

router = APIRouter()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went away, or the server closed a connection past its body deadline.
        raise RequestTimeout("The request body was not received in time.") from None
    return b"".join(chunks)


async def forward(request: Request, endpoint: str, span: Span) -> Response:
    """One inference request up to the engine (or, for a repeated ``Idempotency-Key``, the
    stored answer): raises ``GatewayError`` when it is refused."""
    principal = await authenticate(request)
    svc = services(request.scope)
    if not svc.audit.healthy:
        raise AuditUnavailable("The audit trail cannot be written; requests are refused "
                               "until it can. Retry shortly.", 5)
    policy = svc.gate.authorize(principal, endpoint)
    settings = svc.settings
    ctx = context(request.scope)
    ctx.policy = policy
    ctx.decisions = decisions = Decisions()
    limit = settings.max_body_bytes
    if policy.caps.body_bytes is not None:
        limit = min(limit, policy.caps.body_bytes)
    raw = await read_body(request, limit)
    deadline = time.monotonic() + settings.inspect_timeout_s
    prepared = await svc.offload.run(len(raw), partial(
        intake.prepare, raw, endpoint, principal, policy, svc.pool, svc.gate, svc.protector,
        ctx, decisions, deadline))
    parsed = prepared.parsed
    claim = None
    idempotency_key = _idempotency_key(request)
    if idempotency_key is not None:
        if parsed.stream:
            raise InvalidRequest("Idempotency-Key applies to non-streamed requests only.",
                                 param="Idempotency-Key", code="idempotency_stream")
        found = await svc.idempotency.begin(
            principal.client_id or principal.key_id, idempotency_key, raw,
            wait_s=settings.idempotency_wait_s)
        if isinstance(found, Replay):  # answered before: neither run nor charged again
            ctx.idempotent_replay = True
            svc.metrics.count_replay(parsed.route.name)
            return Response(found.body, found.status, media_type="application/json",
                            headers={"idempotent-replayed": "true"})
        claim = found
    try:
        return await _admit(svc, request, prepared, policy, principal, span, claim)
    except BaseException:
        if claim is not None:
            await claim.release()  # refused before the engine: the key is free again
        raise


async def _admit(svc: Services, request: Request, prepared: intake.Prepared, policy: Policy,
                 principal: Principal, span: Span, claim: Claim | None) -> RelayResponse:
    ctx = context(request.scope)
    parsed, inspection, endpoint = prepared.parsed, prepared.inspection, prepared.parsed.endpoint
    bounds = await _tighten(svc.upstream, prepared, policy, ctx.request_id)
    fallbacks = _fallbacks(svc.pool, policy, parsed)
    # Reserved for the largest context that may answer: a fallback's may exceed the model's.
    context_len = max([parsed.route.max_model_len, *(f.max_model_len for f in fallbacks)])
    price = cost.bound(prepared.request, bounds, context_len)
    cost.check_request_tokens(policy, price)
    output = (svc.protector.output_filter(policy, inspection)
              if endpoint != "embeddings" else None)
    span.set(tracing.MODEL, parsed.route.name)
    with span.child(tracing.ADMISSION, {tracing.CLIENT: principal.client_id or ""}):
        admission = await svc.gate.admit(principal, policy, parsed.route.name, price)
    ctx.reserved_tokens = price.tokens
    return RelayResponse(svc.upstream, parsed, ctx, svc.gate, admission, output, fallbacks,
                         span, claim)


def _idempotency_key(request: Request) -> str | None:
    values = request.headers.getlist(HEADER)
    if len(values) > 1:
        raise InvalidRequest("Send one Idempotency-Key header.", param="Idempotency-Key",
                             code="invalid_idempotency_key")
    return values[0] if values else None


def _fallbacks(pool: EnginePool, policy: Policy, parsed: intake.ParsedRequest
               ) -> list[ModelRoute]:
    """The client's fallback models for this request's model (never for a pinned version),
    each one the client may use and that serves this endpoint."""
    names = policy.fallbacks.get(parsed.route.name)
    if not names or parsed.pinned is not None:
        return []
    routes = []
    for name in names:
        route = pool.route(name)
        if (route is not None and policy.allows_model(name)
                and parsed.endpoint in ENDPOINTS_BY_TASK[route.task]):
            routes.append(route)
    return routes


async def _tighten(upstream: Upstream, prepared: intake.Prepared, policy: Policy,
                   request_id: str) -> list[int]:
    """Each prompt's bound, replaced by the engine's own count (``/tokenize``) where a cap
    would otherwise refuse on the byte bound: the prompt-length cap, per prompt; the
    per-request token cap, for every prompt."""
    request, parsed = prepared.request, prepared.parsed
    bounds = list(prepared.bounds)
    if parsed.endpoint == "embeddings":
        return bounds
    max_len = parsed.route.max_model_len
    cap = policy.caps.prompt_tokens
    over = {i for i, b in enumerate(bounds) if cap is not None and b > cap}
    per_request = policy.caps.request_tokens
    whole = per_request is not None and cost.bound(request, bounds, max_len).tokens > per_request
    wanted = range(len(bounds)) if whole else sorted(over)
    if not wanted:
        return bounds
    bodies = cost.tokenize_bodies(request, wanted)
    counts = await asyncio.gather(*(
        upstream.count_tokens(parsed.route, body, request_id, parsed.pinned)
        for body in bodies.values()))
    for i, count in zip(bodies, counts, strict=True):
        if count is not None:
            bounds[i] = min(count, max_len)
    for i in sorted(over):
        if i not in bodies or counts[list(bodies).index(i)] is None:
            raise EngineUnavailable(f"The prompt of '{parsed.route.name}' could not be "
                                    "measured against this client's cap; retry shortly.", 5)
        if cap is not None and bounds[i] > cap:
            raise InvalidRequest(f"The prompt is {bounds[i]} tokens; this client may send at "
                                 f"most {cap}.", param=_prompt_param(parsed.endpoint),
                                 code="prompt_too_long")
    return bounds


def _prompt_param(endpoint: str) -> str:
    return "messages" if endpoint == "chat" else "prompt"


def _handler(endpoint: str) -> ASGIApp:
    name = f"POST {INFERENCE_PATHS[endpoint]}"

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context(scope)
        span = services(scope).tracing.start_request(
            _header(scope, b"traceparent"), name, {tracing.REQUEST_ID: ctx.request_id})
        if ctx.trace_id is None:
            ctx.trace_id = span.trace_id()  # the audit record names the trace
        try:
            try:
                response = await forward(Request(scope, receive), endpoint, span)
            except Exception as exc:  # every error, answered in one place
                span.error(getattr(exc, "code", None) or type(exc).__name__)
                await send_error(scope, send, exc)
                return
            await response(scope, receive, send)
            if ctx.error_code is not None:
                span.error(ctx.error_code)
        finally:
            span.end()

    return handle


def _header(scope: Scope, name: bytes) -> str | None:
    """The header's value when it is sent exactly once."""
    found = [v for k, v in scope["headers"] if k == name]
    return found[0].decode("latin-1") if len(found) == 1 else None


# The inference paths, for the entry to dispatch ``POST``s to.
ROUTES: dict[str, ASGIApp] = {path: _handler(name) for name, path in INFERENCE_PATHS.items()}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    svc = services(request.scope)
    gate, pool = svc.gate, svc.pool
    policy = gate.authorize(principal, "models")
    await gate.admit_listing(principal, policy)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "enclave",
         "task": route.task, "max_model_len": route.max_model_len,
         "ready": route.ready(),
         "versions": [v.deployment.version.name for v in route.versions]}
        for name, route in sorted(pool.routes.items()) if policy.allows_model(name)
    ]
    return JSONResponse({"object": "list", "data": data})
