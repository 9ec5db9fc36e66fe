"""Signing-key rotation through the admin API and the CLI: tokens in flight stay valid and
every gateway learns the new key."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import jwt
import pytest

from serving.auth.tokens import TokenIssuer
from serving.settings import Settings
from serving.storage.db import create_engine
from serving.storage.signing import SigningKeyRepository
from tests.support import (
    GatewayServer,
    assert_openai_error,
    bearer,
    cli,
    engineless_gateway,
    new_key,
    wait_until,
)
from tests.support.tokens import client_secret, models, published_kids, token_for

# ---------------------------------------------------------------------------------------------
# 4. signing-key rotation


@pytest.fixture(scope="module")
def rot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    yield from engineless_gateway(tmp_path_factory, "gw-rotation")


@pytest.fixture(scope="module")
def rot_secret(rot: GatewayServer) -> str:
    return client_secret(rot.settings, "app")


def test_admin_rotation_keeps_tokens_in_flight_valid(rot: GatewayServer, rot_secret: str) -> None:
    old = token_for(rot, "app", rot_secret)
    old_kid = jwt.get_unverified_header(old)["kid"]
    admin = new_key(rot.settings, "ops", "admin")
    resp = httpx.post(rot.url + "/admin/v1/signing-keys/rotate", headers=bearer(admin))
    assert resp.status_code == 201, resp.text
    new_kid = resp.json()["kid"]
    assert new_kid != old_kid and {old_kid, new_kid} <= set(resp.json()["published"])

    assert models(rot, old).status_code == 200  # the token in flight still works
    new = token_for(rot, "app", rot_secret)
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert models(rot, new).status_code == 200
    assert {old_kid, new_kid} <= published_kids(rot)
    # An app token cannot rotate keys.
    denied = httpx.post(rot.url + "/admin/v1/signing-keys/rotate", headers=bearer(new))
    assert assert_openai_error(denied, 403)["code"] == "permission_denied"


def _mint_with_shared_state(settings: Settings, client: str, scopes: set[str]) -> str:
    """A token from another gateway sharing this one's database and pepper: it signs with
    whatever key the database says is current."""

    async def go() -> str:
        db = create_engine(settings.resolved_database_url)
        try:
            issuer = TokenIssuer(SigningKeyRepository(db), settings.load_pepper(),
                                 settings.oauth_issuer, settings.oauth_audience,
                                 settings.oauth_token_ttl_s)
            await issuer.refresh()
            return issuer.issue(client, frozenset(scopes))[0]
        finally:
            await db.dispose()

    return asyncio.run(go())


def test_cli_rotation_keeps_old_tokens_and_the_gateway_learns_the_new_key(
        rot: GatewayServer, rot_secret: str) -> None:
    old = token_for(rot, "app", rot_secret)
    old_kid = jwt.get_unverified_header(old)["kid"]
    out = cli(rot.settings, "oauth", "rotate-key")
    assert out.returncode == 0, out.stderr
    new_kid = next(w for w in (out.stdout + out.stderr).split() if w.startswith("enc-"))
    assert new_kid != old_kid

    assert models(rot, old).status_code == 200
    new = _mint_with_shared_state(rot.settings, "app", {"models"})
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    # The gateway reloads its keys on an unknown kid, at most every 5 s.
    took = wait_until(lambda: models(rot, new).status_code == 200, timeout_s=8)
    assert took < 6.5
    assert models(rot, old).status_code == 200
    assert {old_kid, new_kid} <= published_kids(rot)
    # Having reloaded, the gateway signs with the new key itself.
    assert jwt.get_unverified_header(token_for(rot, "app", rot_secret))["kid"] == new_kid


