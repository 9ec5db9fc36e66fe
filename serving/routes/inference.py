"""The OpenAI-compatible endpoints. Each one: authenticate, check the caller's policy (scope,
model, caps), read a capped body, validate the fields the gateway acts on, take the client's
rate-limit, concurrency and budget admission, then hand a ``RelayResponse`` to the server.

Only the JSON body names the model: query parameters and headers are never read for it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.deps import Pool, authenticate
from serving.errors import (
    AuditUnavailable,
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)
from serving.responses import JSONResponse
from serving.routes.middleware import context
from serving.routes.relay import RelayResponse, send_error
from serving.services import requests
from serving.services.admission import Gatekeeper
from serving.services.audit import AuditTrail
from serving.services.engines import EnginePool, EngineState, ModelRoute
from serving.services.protection import Decisions, Protector
from serving.services.proxy import Upstream

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
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
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
    ctx = context(request.scope)
    limit: int = state.settings.max_body_bytes
    if policy.caps.body_bytes is not None:
        limit = min(limit, policy.caps.body_bytes)
    raw = await read_body(request, limit)
    payload = requests.decode(raw)
    route, pinned = requests.resolve_model(payload, pool)
    gate.check_model(principal, policy, route, payload["model"])
    ctx.model = route.name
    ctx.policy = policy
    changed, cost = gate.apply_caps(policy, payload, endpoint, route, len(raw))
    protector: Protector = state.protector
    ctx.decisions = Decisions()
    inspection = protector.inspect(policy, payload, endpoint, ctx.decisions)
    ctx.request_text = inspection.request_text
    parsed = requests.validate(payload, raw, endpoint, route, pinned,
                               changed or inspection.changed)
    ctx.stream = parsed.stream
    cap = policy.caps.prompt_tokens
    # A token is at least one byte of the body (byte-level tokenizers; the JSON around the text
    # outweighs the chat template's tokens): only a body longer than the cap is counted.
    if cap is not None and endpoint != "embeddings" and len(parsed.body) > cap:
        await _check_prompt_tokens(upstream, route, endpoint, payload, ctx.request_id, pinned,
                                   cap)
    if endpoint != "embeddings":
        ctx.output = protector.output_filter(policy, inspection)
    admission = await gate.admit(principal, policy, route.name, cost)
    return RelayResponse(upstream, parsed, ctx, gate, admission)


async def _check_prompt_tokens(upstream: Upstream, route: ModelRoute, endpoint: str,
                               payload: dict[str, Any], request_id: str,
                               pinned: EngineState | None, cap: int) -> None:
    count = await upstream.count_prompt_tokens(route, endpoint, payload, request_id, pinned)
    if count is None:
        raise EngineUnavailable(f"The prompt of '{route.name}' could not be measured against "
                                "this client's cap; retry shortly.", 5)
    if count > cap:
        raise InvalidRequest(f"The prompt is {count} tokens; this client may send at most "
                             f"{cap}.", param="messages" if endpoint == "chat" else "prompt",
                             code="prompt_too_long")


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
