"""Typed dependency aliases, in one place. Long-lived services live on ``app.state``.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool,
a thread hop per dependency per request on the hot path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.errors import AuthenticationFailed
from serving.routes.middleware import context
from serving.services.auth import KeyService
from serving.services.auth import Principal as PrincipalT
from serving.services.engines import EnginePool


async def engine_pool(request: Request) -> EnginePool:
    pool: EnginePool = request.app.state.pool
    return pool


async def authenticate(request: Request) -> PrincipalT:
    header = request.headers.get("authorization")
    if header is None:
        raise AuthenticationFailed()
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed()
    keys: KeyService = request.app.state.keys
    principal = await keys.verify(key.strip())
    if principal is None:
        raise AuthenticationFailed()
    context(request.scope).key_id = principal.key_id
    return principal


Principal = Annotated[PrincipalT, Depends(authenticate)]
Pool = Annotated[EnginePool, Depends(engine_pool)]
