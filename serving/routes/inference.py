"""The OpenAI-compatible endpoints. Each one: authenticate, check the caller's scope, read a
capped body, prepare it (``intake.prepare``: the request contract, the model, the policy's fields
and caps, every text inspected; in a worker thread when the body is large), bound its cost, take
the client's rate-limit, concurrency and budget admission, then hand a ``RelayResponse`` to the
server.

Only the JSON body names the model: query parameters and headers are never read for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.deps import Pool, authenticate
from serving.errors import (
    AuditUnavailable,
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
)
from serving.responses import JSONResponse
from serving.routes.middleware import context
from serving.routes.relay import RelayResponse, send_error
from serving.services import cost, intake
from serving.services.admission import Gatekeeper
from serving.services.audit import AuditTrail
from serving.services.engines import EnginePool
from serving.services.offload import Offload
from serving.services.protection import Decisions, Protector
from serving.services.proxy import Upstream
from serving.settings import Settings
from serving.storage.policies import Policy

router = APIRouter()
log = logging.getLogger("enclave.errors")


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


async def _forward(request: Request, endpoint: str) -> RelayResponse:
    # The hot path calls auth and reads app.state directly: FastAPI's dependency solving is
    # a measurable share of a proxied request (see README, benchmark).
    principal = await authenticate(request)
    state = request.app.state
    trail: AuditTrail = state.audit
    if not trail.healthy:
        raise AuditUnavailable("The audit trail cannot be written; requests are refused "
                               "until it can. Retry shortly.", 5)
    gate: Gatekeeper = state.gate
    policy = gate.authorize(principal, endpoint)
    pool: EnginePool = state.pool
    upstream: Upstream = state.upstream
    settings: Settings = state.settings
    ctx = context(request.scope)
    ctx.policy = policy
    ctx.decisions = Decisions()
    limit = settings.max_body_bytes
    if policy.caps.body_bytes is not None:
        limit = min(limit, policy.caps.body_bytes)
    raw = await read_body(request, limit)
    protector: Protector = state.protector
    offload: Offload = state.offload
    deadline = time.monotonic() + settings.inspect_timeout_s
    prepared = await offload.run(len(raw), partial(
        intake.prepare, raw, endpoint, principal, policy, pool, gate, protector, ctx, deadline))
    parsed, inspection = prepared.parsed, prepared.inspection
    ctx.request_text = inspection.request_text
    ctx.stream = parsed.stream
    bounds = await _tighten(upstream, prepared, policy, ctx.request_id)
    price = cost.bound(prepared.request, bounds, parsed.route.max_model_len)
    cost.check_request_tokens(policy, price)
    if endpoint != "embeddings":
        ctx.output = protector.output_filter(policy, inspection)
    admission = await gate.admit(principal, policy, parsed.route.name, price)
    ctx.reserved_tokens = price.tokens
    return RelayResponse(upstream, parsed, ctx, gate, admission)


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
        upstream.count_tokens(parsed.route, body, request_id, parsed.engine)
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


def _direct(endpoint: str) -> ASGIApp:
    """The endpoint as a bare ASGI app, which the request middleware calls directly for
    ``POST`` to the inference paths: FastAPI's routing and exception layers cost about a sixth
    of a proxied request's CPU (measured with py-spy under load). Errors are answered exactly
    as the FastAPI handlers answer them."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context(scope)
        try:
            response = await _forward(Request(scope, receive), endpoint)
        except GatewayError as exc:
            ctx.error_code = exc.log_code
            await send_error(send, exc)
            return
        except Exception as exc:
            log.error("unhandled error", exc_info=exc)
            ctx.error_code = "internal_error"
            await send_error(send, GatewayError("Internal error."))
            return
        await response(scope, receive, send)

    return app


DIRECT: dict[str, ASGIApp] = {path: _direct(endpoint) for path, endpoint in (
    ("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"))}


# The same endpoints through FastAPI: reached only without the request middleware (which
# answers these paths itself); they keep the API's shape in one place.
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Any:
    return await _forward(request, "chat")


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Any:
    return await _forward(request, "completions")


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request) -> Any:
    return await _forward(request, "embeddings")


@router.get("/v1/models")
async def list_models(request: Request, pool: Pool) -> JSONResponse:
    principal = await authenticate(request)
    gate: Gatekeeper = request.app.state.gate
    policy = gate.authorize(principal, "models")
    await gate.admit_listing(principal, policy)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "enclave",
         "task": route.task, "max_model_len": route.max_model_len,
         "ready": any(e.healthy for e in route.engines),
         "versions": [e.deployment.version.name for e in route.engines]}
        for name, route in sorted(pool.routes.items()) if policy.allows_model(name)
    ]
    return JSONResponse({"object": "list", "data": data})
