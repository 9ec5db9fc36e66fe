"""Helpers for the OAuth and token tests: building JWTs by hand, the token endpoint, the
published keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import httpx
import jwt

from serving.settings import Settings
from tests.support import (
    GatewayServer,
    bearer,
    cli,
)

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
ALL_SCOPES = "chat completions embeddings models"


# ---------------------------------------------------------------------------------------------
# helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HMAC-signed JWT built by hand (PyJWT refuses a PEM-looking HMAC secret)."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def models(gw: GatewayServer, token: str) -> httpx.Response:
    return httpx.get(gw.url + "/v1/models", headers=bearer(token))


def chat(gw: GatewayServer, token: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(token))


def exchange(gw: GatewayServer, **form: str) -> httpx.Response:
    return httpx.post(gw.url + "/oauth/token", data=form)


def client_secret(settings: Settings, client: str, *args: str) -> str:
    """A client secret via the real CLI (the client is created with policy default if new)."""
    made = cli(settings, "clients", "create", client, "--policy", "default")
    assert made.returncode == 0 or "exists already" in made.stderr, made.stderr
    out = cli(settings, "clients", "secret", client, *args)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-enc-"), out.stdout
    return secret


def token_for(gw: GatewayServer, client: str, secret: str, **extra: str) -> str:
    resp = exchange(gw, grant_type="client_credentials", client_id=client,
                    client_secret=secret, **extra)
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


def jwks(gw: GatewayServer) -> dict[str, Any]:
    resp = httpx.get(gw.url + "/.well-known/jwks.json")
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def published_kids(gw: GatewayServer) -> set[str]:
    return {k["kid"] for k in jwks(gw)["keys"]}


