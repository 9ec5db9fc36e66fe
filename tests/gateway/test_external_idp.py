"""Tokens from an external identity provider (a JWKS server the test runs): accepted with
their scopes, refused when bad, key rotation picked up, its admin scope never Enclave's."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jwt.algorithms import RSAAlgorithm

from serving.settings import Settings
from tests.support import (
    GatewayServer,
    assert_openai_error,
    bearer,
    cli,
    copy_manifests,
    gateway_settings,
    running_gateway,
    wait_until,
)
from tests.support.tokens import b64url, chat, hs256, models, unverified_claims

# ---------------------------------------------------------------------------------------------
# 5. an external identity provider


class JwksServer:
    """A stand-in identity provider's JWKS endpoint on loopback; ``keys`` can change."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200 if self.path == "/jwks" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class RsaKey:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=kid, alg="RS256", use="sig")
        self.pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": "https://idp.test", "aud": "enclave-api",
                                  "azp": "partner", "scope": "models", "iat": now,
                                  "exp": now + 300, "sub": "svc-123"}
        claims.update(overrides)
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, self.private,
                          algorithm="RS256", headers={"kid": self.kid})


def idp_settings(root: Path, url: str) -> Settings:
    return gateway_settings(root, copy_manifests(root / "models"),
                            oidc_issuer="https://idp.test", oidc_audience="enclave-api",
                            oidc_jwks_url=url)


@pytest.fixture(scope="module")
def idp_key() -> RsaKey:
    return RsaKey("idp-key-1")


@pytest.fixture(scope="module")
def idp(idp_key: RsaKey) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.keys = [idp_key.jwk]
        yield server


@pytest.fixture(scope="module")
def idp_gw(tmp_path_factory: pytest.TempPathFactory, idp: JwksServer,
           ) -> Iterator[GatewayServer]:
    root = tmp_path_factory.mktemp("gw-idp")
    settings = idp_settings(root, idp.url)
    made = cli(settings, "clients", "create", "partner", "--policy", "default")
    assert made.returncode == 0, made.stderr
    with running_gateway(settings) as server:
        yield server


def test_an_idp_token_is_accepted_with_its_scopes(idp_gw: GatewayServer, idp_key: RsaKey) -> None:
    token = idp_key.sign()
    resp = models(idp_gw, token)
    assert resp.status_code == 200, resp.text
    assert {m["id"] for m in resp.json()["data"]} == {"demo-chat", "minilm-embed"}
    assert assert_openai_error(chat(idp_gw, token), 403)["code"] == "permission_denied"
    # With 'chat' in its scope it passes admission and meets the missing engine.
    chatty = idp_key.sign(scope="models chat")
    assert assert_openai_error(chat(idp_gw, chatty), 503)["code"] == "engine_unavailable"


@pytest.mark.parametrize(("case", "overrides", "why"), [
    ("unknown client", {"azp": "stranger"}, "unknown or disabled client"),
    ("no client claim", {"azp": None}, "'azp'"),
    ("wrong audience", {"aud": "enclave-gateway"}, "audience"),
    ("expired", {"iat": int(time.time()) - 3600, "exp": int(time.time()) - 600}, "expired"),
])
def test_bad_idp_tokens_are_refused(idp_gw: GatewayServer, idp_key: RsaKey, case: str,
                                    overrides: dict[str, Any], why: str) -> None:
    resp = models(idp_gw, idp_key.sign(**overrides))
    error = assert_openai_error(resp, 401)
    assert error["code"] == "invalid_api_key" and why in error["message"], case


def test_an_idp_token_signed_hs256_with_the_rsa_public_key_is_refused(
        idp_gw: GatewayServer, idp_key: RsaKey) -> None:
    assert models(idp_gw, idp_key.sign()).status_code == 200
    claims = unverified_claims(idp_key.sign(scope="models chat"))
    for secret in (idp_key.pem, json.dumps(idp_key.jwk).encode()):
        forged = hs256({"alg": "HS256", "typ": "JWT", "kid": idp_key.kid}, claims, secret)
        error = assert_openai_error(models(idp_gw, forged), 401)
        assert "algorithm not accepted" in error["message"]
    impostor = RsaKey(idp_key.kid)  # right kid, wrong key
    assert models(idp_gw, impostor.sign()).status_code == 401


def test_an_idp_key_rotation_is_picked_up_on_an_unknown_kid(idp_gw: GatewayServer,
                                                            idp: JwksServer,
                                                            idp_key: RsaKey) -> None:
    assert models(idp_gw, idp_key.sign()).status_code == 200  # the key set is loaded
    fresh = RsaKey("idp-key-2")
    token = fresh.sign()
    refused = models(idp_gw, token)
    assert "unknown key" in assert_openai_error(refused, 401)["message"]

    idp.keys = [idp_key.jwk, fresh.jwk]  # the provider publishes its new key
    hits = idp.hits
    statuses: list[int] = []

    def accepted() -> bool:
        statuses.append(models(idp_gw, token).status_code)
        return statuses[-1] == 200

    took = wait_until(accepted, timeout_s=15, step_s=0.5)
    # Refetched at most once per 10 s however often an unknown kid comes: the provider is
    # not hammered, and the new key works within that floor.
    assert took <= 11.5, took
    assert set(statuses) <= {200, 401}
    assert 1 <= idp.hits - hits <= 2, (idp.hits - hits, len(statuses))
    assert models(idp_gw, idp_key.sign()).status_code == 200  # the old key still works


def test_an_unusable_key_in_the_idp_jwks_does_not_break_the_others(
        tmp_path: Path, idp_key: RsaKey) -> None:
    """Providers publish encryption keys and key types we cannot use next to their signing
    keys; those are skipped, not a reason to refuse (or fail on) every token."""
    raw = X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x25519 = {"kty": "OKP", "crv": "X25519", "x": b64url(raw), "kid": "idp-enc-1", "use": "enc"}
    oct_key = {"kty": "oct", "kid": idp_key.kid + "-hmac", "k": b64url(b"k" * 32)}
    with JwksServer() as server:
        server.keys = [x25519, oct_key, idp_key.jwk]
        settings = idp_settings(tmp_path, server.url)
        made = cli(settings, "clients", "create", "partner", "--policy", "default")
        assert made.returncode == 0, made.stderr
        with running_gateway(settings) as gateway:
            resp = models(gateway, idp_key.sign())
            assert resp.status_code == 200, resp.text
            hmac_token = jwt.encode(
                {"iss": "https://idp.test", "aud": "enclave-api", "azp": "partner",
                 "iat": int(time.time()), "exp": int(time.time()) + 300},
                b"k" * 32, algorithm="HS256", headers={"kid": oct_key["kid"]})
            assert models(gateway, hmac_token).status_code == 401


def test_an_idp_tokens_own_admin_scope_is_never_enclaves_admin(
        tmp_path: Path, idp: JwksServer, idp_key: RsaKey) -> None:
    """A provider's scope vocabulary is not ours: "admin" in its token means nothing here unless
    the operator names the provider scope that grants Enclave's admin."""
    def admin_listing(gateway: GatewayServer, token: str) -> httpx.Response:
        return httpx.get(gateway.url + "/admin/v1/clients", headers=bearer(token), timeout=10)

    for mapped in (None, "enclave:admin"):
        root = tmp_path / str(mapped)
        settings = gateway_settings(root, copy_manifests(root / "models"),
                                    oidc_issuer="https://idp.test", oidc_audience="enclave-api",
                                    oidc_jwks_url=idp.url, oidc_admin_scope=mapped)
        made = cli(settings, "clients", "create", "ops", "--policy", "admin")
        assert made.returncode == 0, made.stderr
        with running_gateway(settings) as gateway:
            plain = admin_listing(gateway, idp_key.sign(azp="ops", scope="admin"))
            assert assert_openai_error(plain, 403)["code"] == "permission_denied"
            named = admin_listing(gateway, idp_key.sign(azp="ops", scope="enclave:admin"))
            assert named.status_code == (200 if mapped else 403), named.text

