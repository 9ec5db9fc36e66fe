"""The token issuer and verifier in process (SQLite in a temporary directory): genuine
tokens verify, genuinely signed tokens with bad claims or header tricks are refused."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serving.auth.tokens import LEEWAY_S, TokenIssuer, TokenRejected, TokenVerifier
from serving.storage import migrate
from serving.storage.db import create_engine
from serving.storage.signing import SigningKeyRepository
from tests.support.tokens import hs256, segment


@pytest.fixture
async def local(tmp_path: Path) -> Any:
    """Our issuer and verifier in-process, on a fresh database: the only way to sign tokens
    with bad claims under a genuine key."""
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await migrate.upgrade(db)
    issuer = TokenIssuer(SigningKeyRepository(db), b"p" * 40, "enclave", "enclave-gateway", 600)
    await issuer.start()
    yield issuer, TokenVerifier(issuer, None, None)
    await db.dispose()


def _sign(issuer: TokenIssuer, claims: dict[str, Any]) -> str:
    key = issuer._current
    assert key is not None and key.private is not None
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})


def _good_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "enclave", "aud": "enclave-gateway", "sub": "app", "client_id": "app",
            "scope": "models", "iat": now, "nbf": now, "exp": now + 600,
            "jti": secrets.token_hex(8)}


@pytest.mark.anyio
async def test_a_genuine_token_verifies_in_process(local: Any) -> None:
    issuer, verifier = local
    token, ttl = issuer.issue("app", frozenset({"models", "chat"}))
    claims = await verifier.verify(token)
    assert claims.client_id == "app" and claims.scopes == {"models", "chat"}
    assert ttl == 600 and not claims.external
    # Within the leeway an expired token still passes (clock skew between machines).
    now = int(time.time())
    late = _sign(issuer, {**_good_claims(), "iat": now - 700, "nbf": now - 700, "exp": now - 5})
    assert (await verifier.verify(late)).client_id == "app"


BAD_CLAIMS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong audience": ({"aud": "someone-else"}, "token audience not accepted"),
    "wrong issuer": ({"iss": "mallory"}, "token issuer not accepted"),
    "expired": ({"iat": -900, "nbf": -900, "exp": -(LEEWAY_S + 10)}, "token expired"),
    "not yet valid": ({"nbf": 300}, "token not yet valid"),
    "no exp": ({"exp": None}, "token signature or claims invalid"),
    "no aud": ({"aud": None}, "token signature or claims invalid"),
    "no scope": ({"scope": None}, "token lacks client or scope"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
async def test_genuinely_signed_tokens_with_bad_claims_are_refused(local: Any,
                                                                   case: str) -> None:
    issuer, verifier = local
    changes, message = BAD_CLAIMS[case]
    claims = _good_claims()
    now = int(time.time())
    for name, value in changes.items():
        if value is None:
            claims.pop(name)
        elif name in ("iat", "nbf", "exp"):
            claims[name] = now + value
        else:
            claims[name] = value
    token = _sign(issuer, claims)
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert str(info.value) == message
    assert token not in str(info.value)


@pytest.mark.anyio
async def test_header_tricks_are_refused_in_process(local: Any) -> None:
    issuer, verifier = local
    key = issuer._current
    claims = _good_claims()
    raw = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    cases = {
        f"{segment({'alg': 'none', 'kid': key.kid})}.{segment(claims)}.":
            "token algorithm not accepted",
        hs256({"alg": "HS256", "kid": key.kid}, claims, raw): "token algorithm not accepted",
        jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                   headers={"kid": key.kid}): "token signature or claims invalid",
        jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                   headers={"kid": "enc-nope"}): "token signed by an unknown key",
        "eyJhbGciOi.not-json.x": "malformed token",
    }
    for token, message in cases.items():
        with pytest.raises(TokenRejected, match=f"^{message}$"):
            await verifier.verify(token)


