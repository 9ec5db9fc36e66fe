"""The OpenAI-compatible endpoints. Each one: authenticate, read a capped body, validate the
fields the gateway acts on, then hand a ``RelayResponse`` to the server.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serving.deps import Pool, Principal, authenticate
from serving.errors import InvalidRequest, PayloadTooLarge
from serving.responses import JSONResponse
from serving.routes.middleware import context
from serving.routes.relay import RelayResponse
from serving.services import requests
from serving.services.engines import EnginePool
from serving.services.proxy import Upstream

router = APIRouter()


async def read_body(request: Request) -> bytes:
    limit: int = request.app.state.settings.max_body_bytes
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
    await authenticate(request)
    state = request.app.state
    pool: EnginePool = state.pool
    upstream: Upstream = state.upstream
    ctx = context(request.scope)
    raw = await read_body(request)
    payload = requests.decode(raw)
    route = requests.resolve_model(payload, endpoint, pool)
    ctx.model = route.name
    parsed = requests.validate(payload, raw, endpoint, route)
    ctx.stream = parsed.stream
    return RelayResponse(upstream, parsed, ctx)


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
async def list_models(_: Principal, pool: Pool) -> JSONResponse:
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "enclave",
         "task": route.task, "max_model_len": route.max_model_len,
         "ready": any(e.healthy for e in route.engines)}
        for name, route in sorted(pool.routes.items())
    ]
    return JSONResponse({"object": "list", "data": data})
