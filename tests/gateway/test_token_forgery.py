"""Forged and invalid access tokens against a real gateway: every forgery is refused, and
the message says why without echoing the token."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from tests.support import (
    GatewayServer,
    assert_openai_error,
)
from tests.support.tokens import (
    hs256,
    jwks,
    models,
    segment,
    unverified_claims,
)

# The gateway, the client "app" and its token: tests/gateway/conftest.py.



# ---------------------------------------------------------------------------------------------
# 3. forged and invalid tokens


def _real_public(gw: GatewayServer, kid: str) -> Any:
    jwk = next(k for k in jwks(gw)["keys"] if k["kid"] == kid)
    return OKPAlgorithm.from_jwk(json.dumps(jwk))


def forge(kind: str, gw: GatewayServer, real: str) -> str:
    header = jwt.get_unverified_header(real)
    kid = header["kid"]
    claims = unverified_claims(real)
    if kind == "alg none":
        return f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{segment(claims)}."
    if kind == "alg None, signature kept":
        return f"{segment({'alg': 'None', 'kid': kid})}.{segment(claims)}.{real.split('.')[2]}"
    if kind.startswith("HS256"):
        public = _real_public(gw, kid)
        secret = {
            "HS256 with the raw public key": public.public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            "HS256 with the public key PEM": public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "HS256 with the JWK": json.dumps(
                next(k for k in jwks(gw)["keys"] if k["kid"] == kid)).encode(),
        }[kind]
        return hs256({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, secret)
    if kind == "another Ed25519 key, real kid":
        return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                          headers={"kid": kid})
    if kind == "unknown kid":
        return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                          headers={"kid": "enc-20990101-deadbeef"})
    if kind == "no kid":
        return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    if kind == "claims changed, signature kept":
        widened = {**claims, "scope": "admin chat models", "exp": claims["exp"] + 86400}
        head, _, sig = real.split(".")
        return f"{head}.{segment(widened)}.{sig}"
    raise AssertionError(kind)


FORGERIES = ["alg none", "alg None, signature kept", "HS256 with the raw public key",
             "HS256 with the public key PEM", "HS256 with the JWK",
             "another Ed25519 key, real kid", "unknown kid", "no kid",
             "claims changed, signature kept"]


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_tokens_are_refused(gw: GatewayServer, app_token: str, kind: str) -> None:
    assert models(gw, app_token).status_code == 200  # the genuine one passes
    forged = forge(kind, gw, app_token)
    assert forged != app_token
    resp = models(gw, forged)
    error = assert_openai_error(resp, 401)
    assert error["code"] == "invalid_api_key"
    assert error["message"].startswith("Invalid access token: ")
    assert resp.headers["www-authenticate"] == "Bearer"
    assert forged not in resp.text and forged.split(".")[1] not in resp.text


def test_forged_token_messages_say_why(gw: GatewayServer, app_token: str) -> None:
    why = {kind: models(gw, forge(kind, gw, app_token)).json()["error"]["message"]
           for kind in ("alg none", "HS256 with the public key PEM", "unknown kid",
                        "another Ed25519 key, real kid")}
    assert "algorithm not accepted" in why["alg none"]
    assert "algorithm not accepted" in why["HS256 with the public key PEM"]
    assert "unknown key" in why["unknown kid"]
    assert "signature" in why["another Ed25519 key, real kid"]


