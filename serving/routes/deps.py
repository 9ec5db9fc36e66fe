"""The web layer's access to the gateway's services (``services``, the one accessor), and
authentication as typed dependencies.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool,
a thread hop per dependency per request on the hot path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Scope

from serving.auth.clients import ClientService
from serving.auth.keys import LookupsThrottled
from serving.auth.tokens import TokenRejected, TokenVerifier, looks_like_jwt
from serving.container import Services
from serving.domain.policy import INFERENCE_SCOPES
from serving.domain.principal import Principal as PrincipalT
from serving.errors import AuthenticationFailed, PermissionDenied, RateLimited
from serving.routes.context import context
from serving.upstream.pool import EnginePool


def services(scope: Scope) -> Services:
    """The running gateway's services (built in the app's lifespan)."""
    svc: Services = scope["app"].state.services
    return svc


async def engine_pool(request: Request) -> EnginePool:
    return services(request.scope).pool


def bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None:
        raise AuthenticationFailed()
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise AuthenticationFailed()
    return value


async def authenticate(request: Request) -> PrincipalT:
    """An API key or a signed token (ours or the configured identity provider's)."""
    credential = bearer(request)
    svc = services(request.scope)
    if looks_like_jwt(credential):
        principal = await _from_token(credential, svc.tokens, svc.clients,
                                      svc.settings.oidc_admin_scope)
    else:
        keys = svc.keys
        client = request.scope.get("client")
        try:
            record = await keys.verify(credential, address=str(client[0]) if client else None)
        except LookupsThrottled:
            raise RateLimited("Too many unknown keys from this address; retry in a minute.",
                              60) from None
        if record is None:
            raise AuthenticationFailed()
        principal = keys.principal(record)
    ctx = context(request.scope)
    ctx.key_id = principal.key_id
    ctx.client_id = principal.client_id
    return principal


async def _from_token(token: str, verifier: TokenVerifier, clients: ClientService,
                      admin_scope: str | None) -> PrincipalT:
    try:
        claims = await verifier.verify(token)
    except TokenRejected as exc:
        raise AuthenticationFailed(f"Invalid access token: {exc}.") from None
    client = await clients.get(claims.client_id)
    if client is None or not client.active:
        raise AuthenticationFailed("Invalid access token: unknown or disabled client.")
    # A provider's token that says nothing about scopes gets the inference scopes, bounded by
    # the client's policy; admin must always be asked for explicitly.
    scopes = frozenset(claims.scopes if claims.scopes is not None else INFERENCE_SCOPES)
    if claims.external:
        # The provider's scope vocabulary is not ours: its "admin" means nothing here. Only
        # the scope the operator named (ENCLAVE_OIDC_ADMIN_SCOPE) grants Enclave's admin.
        granted = admin_scope is not None and admin_scope in scopes
        scopes = (scopes - {"admin"}) | ({"admin"} if granted else frozenset())
    return PrincipalT(key_id=f"jwt:{claims.token_id[:16]}", name=client.id,
                      client_id=client.id, policy=client.policy, scopes=scopes, via="token")


async def require_admin(request: Request) -> PrincipalT:
    principal = await authenticate(request)
    policies = services(request.scope).policies
    policy = policies.get(principal.policy) if principal.policy else None
    if "admin" not in principal.scopes or policy is None or "admin" not in policy.scopes:
        raise PermissionDenied("The admin API needs a key or token with the 'admin' scope.")
    return principal


Principal = Annotated[PrincipalT, Depends(authenticate)]
Admin = Annotated[PrincipalT, Depends(require_admin)]
Pool = Annotated[EnginePool, Depends(engine_pool)]
