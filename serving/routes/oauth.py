"""OAuth2 client credentials (RFC 6749 §4.4) and the public keys that verify our tokens.

``POST /oauth/token`` takes ``grant_type=client_credentials`` with the client's id and secret,
in the form body or as HTTP Basic credentials, and an optional ``scope`` to narrow the token.
Errors are OpenAI-shaped like every other error of the gateway; ``code`` carries the RFC 6749
error code (``invalid_client``, ``invalid_scope``, ``unsupported_grant_type``, ...).
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qs, unquote_plus

import orjson
from fastapi import APIRouter, Request

from serving.admission.policy_store import PolicyStore
from serving.auth.clients import ClientService
from serving.auth.keys import KeyService, LookupsThrottled
from serving.auth.tokens import TokenIssuer
from serving.errors import AuthenticationFailed, InvalidRequest, RateLimited
from serving.routes.context import context
from serving.routes.deps import services
from serving.routes.inference import read_body
from serving.routes.responses import JSONResponse

router = APIRouter()
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class InvalidClient(AuthenticationFailed):
    code = "invalid_client"

    def __init__(self) -> None:
        super().__init__("Client authentication failed: unknown client, wrong or revoked "
                         "secret, or a disabled client.")


def _form(raw: bytes, content_type: str) -> dict[str, str]:
    if content_type.startswith("application/json"):
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.",
                                 code="invalid_request") from None
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be an object.", code="invalid_request")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidRequest("The form is not UTF-8.", code="invalid_request") from None
    for name, values in parsed.items():
        if len(values) > 1:
            raise InvalidRequest(f"'{name}' is given more than once.", param=name,
                                 code="invalid_request")
    return {k: v[0] for k, v in parsed.items()}


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization")
    if header is None or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient() from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient()
    return unquote_plus(client_id), unquote_plus(secret)


@router.post("/oauth/token")
async def token(request: Request) -> JSONResponse:
    state = services(request.scope)
    raw = await read_body(request, 16 * 1024)
    form = _form(raw, request.headers.get("content-type", ""))
    if form.get("grant_type") != "client_credentials":
        raise InvalidRequest("Only grant_type=client_credentials is supported.",
                             param="grant_type", code="unsupported_grant_type")
    basic = _basic(request)
    if basic is not None and ("client_secret" in form):
        raise InvalidRequest("Give the client credentials once: in the form or as Basic.",
                             code="invalid_request")
    client_id, secret = basic if basic is not None else (form.get("client_id", ""),
                                                         form.get("client_secret", ""))
    keys: KeyService = state.keys
    clients: ClientService = state.clients
    policies: PolicyStore = state.policies
    address = request.scope.get("client")
    try:
        record = await keys.verify(secret, kind="secret",
                                   address=str(address[0]) if address else None)
    except LookupsThrottled:
        raise RateLimited("Too many unknown secrets from this address; retry in a minute.",
                          60) from None
    if record is None or record.client_id != client_id:
        raise InvalidClient()
    client = await clients.get(client_id)
    policy = policies.get(client.policy) if client is not None else None
    if client is None or not client.active or policy is None:
        raise InvalidClient()
    granted = record.scopes & frozenset(policy.scopes)
    asked = form.get("scope")
    if asked is not None and asked.strip():
        wanted = frozenset(asked.split())
        if not wanted <= granted:
            extra = " ".join(sorted(wanted - granted))
            raise InvalidRequest(f"Scope not granted to this client: {extra}.", param="scope",
                                 code="invalid_scope")
        granted = wanted
    if not granted:
        raise InvalidRequest("This client has no scope it may be given.", param="scope",
                             code="invalid_scope")
    context(request.scope).client_id = client_id
    context(request.scope).key_id = record.id
    issuer: TokenIssuer = state.issuer
    access_token, expires_in = issuer.issue(client_id, granted)
    return JSONResponse({"access_token": access_token, "token_type": "Bearer",
                         "expires_in": expires_in, "scope": " ".join(sorted(granted))},
                        headers=_NO_STORE)


@router.get("/.well-known/jwks.json")
async def jwks(request: Request) -> JSONResponse:
    issuer: TokenIssuer = services(request.scope).issuer
    return JSONResponse(issuer.jwks(), headers={"Cache-Control": "public, max-age=60"})
