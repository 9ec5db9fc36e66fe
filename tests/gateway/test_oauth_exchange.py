"""The OAuth2 client-credentials exchange at ``POST /oauth/token`` and the keys the gateway
publishes, as a caller sees them: real gateways on real servers, no engine."""

from __future__ import annotations

import json

import httpx
import jwt
import pytest

from tests.support import (
    GatewayServer,
    assert_openai_error,
    cli,
    new_key,
    wait_until,
)
from tests.support.tokens import (
    ALL_SCOPES,
    chat,
    client_secret,
    exchange,
    jwks,
    models,
    token_for,
    unverified_claims,
)

# The gateway, the client "app" and its token: tests/gateway/conftest.py.




def test_form_exchange_gives_a_bearer_token_that_lists_models(gw: GatewayServer,
                                                              app_secret: str) -> None:
    resp = exchange(gw, grant_type="client_credentials", client_id="app",
                    client_secret=app_secret)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == gw.settings.oauth_token_ttl_s == 600
    assert body["scope"] == ALL_SCOPES
    assert resp.headers["cache-control"] == "no-store"
    assert app_secret not in resp.text
    claims = unverified_claims(body["access_token"])
    assert claims["iss"] == "enclave" and claims["aud"] == "enclave-gateway"
    assert claims["client_id"] == "app" and claims["exp"] - claims["iat"] == 600
    assert app_secret not in json.dumps(claims)

    listed = models(gw, body["access_token"])
    assert listed.status_code == 200, listed.text
    assert {m["id"] for m in listed.json()["data"]} == {"demo-chat", "minilm-embed"}
    # With 'chat', auth and admission pass and only the missing engine answers.
    assert assert_openai_error(chat(gw, body["access_token"]), 503)["code"] == \
        "engine_unavailable"


def test_basic_auth_exchange_works_too(gw: GatewayServer, app_secret: str) -> None:
    resp = httpx.post(gw.url + "/oauth/token", data={"grant_type": "client_credentials"},
                      auth=("app", app_secret))
    assert resp.status_code == 200, resp.text
    assert resp.json()["token_type"] == "Bearer" and resp.json()["scope"] == ALL_SCOPES
    assert models(gw, resp.json()["access_token"]).status_code == 200


def test_a_narrowed_token_carries_only_its_scopes(gw: GatewayServer, app_secret: str) -> None:
    resp = exchange(gw, grant_type="client_credentials", client_id="app",
                    client_secret=app_secret, scope="models")
    assert resp.status_code == 200, resp.text
    assert resp.json()["scope"] == "models"
    token = resp.json()["access_token"]
    assert unverified_claims(token)["scope"] == "models"
    assert models(gw, token).status_code == 200
    error = assert_openai_error(chat(gw, token), 403)
    assert error["code"] == "permission_denied" and "'chat'" in error["message"]


def test_a_scope_beyond_the_secret_is_invalid_scope(gw: GatewayServer, app_secret: str) -> None:
    narrow = client_secret(gw.settings, "narrow", "--scopes", "models")
    plain = exchange(gw, grant_type="client_credentials", client_id="narrow",
                     client_secret=narrow)
    assert plain.status_code == 200 and plain.json()["scope"] == "models", plain.text
    for client, secret, asked in (("narrow", narrow, "chat"), ("narrow", narrow, "models chat"),
                                  ("app", app_secret, "admin")):
        resp = exchange(gw, grant_type="client_credentials", client_id=client,
                        client_secret=secret, scope=asked)
        error = assert_openai_error(resp, 400)
        assert error["code"] == "invalid_scope" and error["param"] == "scope", asked
        assert secret not in resp.text


@pytest.fixture(scope="module")
def bad_credentials(gw: GatewayServer, app_secret: str) -> dict[str, tuple[str, str]]:
    last = "A" if app_secret[-1] != "A" else "B"
    other = client_secret(gw.settings, "other")
    return {
        "wrong secret": ("app", app_secret[:-1] + last),
        "another client's secret": ("app", other),
        "right secret, wrong client id": ("other", app_secret),
        "unknown client": ("nobody", app_secret),
        "an API key as secret": ("app", new_key(gw.settings, "app")),
        "no secret": ("app", ""),
        "not a key at all": ("app", "hunter2"),
    }


@pytest.mark.parametrize("case", ["wrong secret", "another client's secret",
                                  "right secret, wrong client id", "unknown client",
                                  "an API key as secret", "no secret", "not a key at all"])
@pytest.mark.parametrize("how", ["form", "basic"])
def test_bad_client_credentials_are_invalid_client(gw: GatewayServer, case: str, how: str,
                                                   bad_credentials: dict[str, tuple[str, str]],
                                                   ) -> None:
    client, secret = bad_credentials[case]
    if how == "form":
        resp = exchange(gw, grant_type="client_credentials", client_id=client,
                        client_secret=secret)
    else:
        resp = httpx.post(gw.url + "/oauth/token", data={"grant_type": "client_credentials"},
                          auth=(client, secret))
    error = assert_openai_error(resp, 401)
    assert error["code"] == "invalid_client"
    assert error["type"] == "authentication_error"
    if len(secret) > 4:
        assert secret not in resp.text


def test_a_revoked_secret_is_invalid_client(gw: GatewayServer) -> None:
    secret = client_secret(gw.settings, "app")
    assert token_for(gw, "app", secret)
    key_id = secret[len("sk-enc-"):len("sk-enc-") + 12]
    revoked = cli(gw.settings, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr

    def refused() -> bool:
        return exchange(gw, grant_type="client_credentials", client_id="app",
                        client_secret=secret).status_code == 401

    wait_until(refused, timeout_s=5)  # the gateway caches keys for key_cache_ttl_s (0.5 s)
    resp = exchange(gw, grant_type="client_credentials", client_id="app", client_secret=secret)
    assert assert_openai_error(resp, 401)["code"] == "invalid_client"
    assert secret not in resp.text


def test_password_grant_is_unsupported(gw: GatewayServer, app_secret: str) -> None:
    resp = exchange(gw, grant_type="password", client_id="app", client_secret=app_secret,
                    username="app", password=app_secret)
    error = assert_openai_error(resp, 400)
    assert error["code"] == "unsupported_grant_type" and error["param"] == "grant_type"
    assert app_secret not in resp.text


def test_an_oauth_secret_is_not_an_api_key(gw: GatewayServer, app_secret: str) -> None:
    resp = models(gw, app_secret)
    assert assert_openai_error(resp, 401)["code"] == "invalid_api_key"
    assert app_secret not in resp.text


# ---------------------------------------------------------------------------------------------
# 2. the token's header and the published keys


def test_tokens_are_eddsa_and_name_a_published_key(gw: GatewayServer, app_token: str) -> None:
    header = jwt.get_unverified_header(app_token)
    assert header["alg"] == "EdDSA" and header["kid"]
    published = jwks(gw)["keys"]
    assert header["kid"] in {k["kid"] for k in published}
    for key in published:
        assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
        assert key["use"] == "sig" and "x" in key
        assert "d" not in key  # no private part, ever
    # Anyone holding the JWKS can verify our tokens offline.
    jwk = next(k for k in published if k["kid"] == header["kid"])
    claims = jwt.decode(app_token, key=jwt.PyJWK(jwk).key, algorithms=["EdDSA"],
                        audience="enclave-gateway", issuer="enclave")
    assert claims["client_id"] == "app"


