"""The OpenAI-compatible endpoints. Each one: authenticate, check the caller's policy (scope,
model, caps), read a capped body, validate the fields the gateway acts on, take the client's
rate-limit, concurrency and budget admission, then hand a ``RelayResponse`` to the server.

Only the JSON body names the model: query parameters and headers are never read for it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serving.deps import Pool, authenticate
from serving.errors import InvalidRequest, PayloadTooLarge
from serving.responses import JSONResponse
from serving.routes.middleware import context
from serving.routes.relay import RelayResponse
from serving.services import requests
from serving.services.admission import Gatekeeper
from serving.services.engines import EnginePool
from serving.services.proxy import Upstream

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
    gate.check_model(principal, policy, route, payload["model"] if pinned is None else
                     f"{route.name}@{pinned.deployment.version.name}")
    ctx.model = route.name
    changed, tokens = gate.apply_caps(policy, payload, endpoint, route, len(raw))
    parsed = requests.validate(payload, raw, endpoint, route, pinned, changed or pinned is not None)
    ctx.stream = parsed.stream
    admission = await gate.admit(principal, policy, route.name, tokens,
                                 min(len(raw), route.max_model_len))
    return RelayResponse(upstream, parsed, ctx, gate, admission)


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
