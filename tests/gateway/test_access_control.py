"""Who may do what, on a real gateway without engines: scopes, model allowlists, key lifetimes,
the admin API, and rate limits in memory and shared through a real Redis by two gateway
processes."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.bench.stores import RedisServer
from serving.settings import Settings
from tests.support import (
    TEST_POLICIES,
    GatewayProcess,
    GatewayServer,
    LogCapture,
    assert_openai_error,
    bearer,
    cli,
    copy_manifests,
    engineless_gateway,
    gateway_settings,
    new_key,
    settings_env,
)


@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    with LogCapture() as capture:
        yield capture


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, logs: LogCapture) -> Iterator[GatewayServer]:
    yield from engineless_gateway(tmp_path_factory, "gw-access")


@pytest.fixture(scope="module")
def admin_key(gw: GatewayServer) -> str:
    return new_key(gw.settings, "ops", "admin")


CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "minilm-embed", "input": "hi"}


def test_scopes_and_model_allowlist_are_enforced(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "embedder", "embed-only")
    models = httpx.get(gw.url + "/v1/models", headers=bearer(key)).json()
    assert [m["id"] for m in models["data"]] == ["minilm-embed"]  # only what it may call
    chat = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert assert_openai_error(chat, 403)["code"] == "permission_denied"
    # Allowed scope, model not allowed: the same 404 as a model that does not exist.
    other = httpx.post(gw.url + "/v1/embeddings", json={**EMBED, "model": "demo-chat"},
                       headers=bearer(key))
    assert assert_openai_error(other, 404)["code"] == "model_not_found"
    # The query string and headers never choose the model.
    sneaky = httpx.post(gw.url + "/v1/embeddings?model=minilm-embed",
                        json={**EMBED, "model": "demo-chat"},
                        headers={**bearer(key), "model": "minilm-embed",
                                 "x-model": "minilm-embed"})
    assert assert_openai_error(sneaky, 404)["code"] == "model_not_found"
    allowed = httpx.post(gw.url + "/v1/embeddings", json=EMBED, headers=bearer(key))
    assert assert_openai_error(allowed, 503)["code"] == "engine_unavailable"  # past every check


def test_a_key_with_fewer_scopes_than_its_policy_gets_only_those(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "lister", "default", "--scopes", "models")
    assert httpx.get(gw.url + "/v1/models", headers=bearer(key)).status_code == 200
    resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert "chat" in str(assert_openai_error(resp, 403)["message"])
    over = cli(gw.settings, "keys", "create", "--client", "lister", "--scopes", "admin")
    assert over.returncode == 1 and "beyond the policy" in over.stderr


def test_expired_revoked_and_rotated_out_keys_fail(gw: GatewayServer) -> None:
    short = new_key(gw.settings, "shortlived", "default", "--expires", "2s")
    assert httpx.get(gw.url + "/v1/models", headers=bearer(short)).status_code == 200
    time.sleep(2.7)  # expiry + the key cache's lifetime
    assert_openai_error(httpx.get(gw.url + "/v1/models", headers=bearer(short)), 401)
    old = new_key(gw.settings, "rotating", "default")
    old_id = old.split("-")[2]
    rotated = cli(gw.settings, "keys", "rotate", old_id, "--grace", "1s")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert httpx.get(gw.url + "/v1/models", headers=bearer(old)).status_code == 200  # grace
    time.sleep(1.7)
    assert_openai_error(httpx.get(gw.url + "/v1/models", headers=bearer(old)), 401)
    assert httpx.get(gw.url + "/v1/models", headers=bearer(new)).status_code == 200
    assert cli(gw.settings, "keys", "revoke", new.split("-")[2]).returncode == 0
    time.sleep(0.7)
    assert_openai_error(httpx.get(gw.url + "/v1/models", headers=bearer(new)), 401)


def test_a_disabled_client_is_refused_within_seconds(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "to-disable", "default")
    assert httpx.get(gw.url + "/v1/models", headers=bearer(key)).status_code == 200
    assert cli(gw.settings, "clients", "set", "to-disable", "--disable").returncode == 0
    time.sleep(0.7)
    assert_openai_error(httpx.get(gw.url + "/v1/models", headers=bearer(key)), 401)


def test_admin_api_manages_clients_and_keys_and_never_shows_secrets(
        gw: GatewayServer, admin_key: str, logs: LogCapture) -> None:
    h = bearer(admin_key)
    made = httpx.post(gw.url + "/admin/v1/clients", headers=h,
                      json={"name": "billing", "policy": "chat-only", "description": "Billing"})
    assert made.status_code == 201, made.text
    dup = httpx.post(gw.url + "/admin/v1/clients", headers=h,
                     json={"name": "billing", "policy": "chat-only"})
    assert assert_openai_error(dup, 400)["code"] == "client_exists"
    bad = httpx.post(gw.url + "/admin/v1/clients", headers=h,
                     json={"name": "x", "policy": "no-such-policy"})
    assert "no-such-policy" in str(assert_openai_error(bad, 400)["message"])
    extra = httpx.post(gw.url + "/admin/v1/keys", headers=h,
                       json={"client": "billing", "scopes": ["chat", "embeddings"]})
    assert "embeddings" in str(assert_openai_error(extra, 400)["message"])
    typo = httpx.post(gw.url + "/admin/v1/keys", headers=h,
                      json={"client": "billing", "expires_in": "soon"})
    assert assert_openai_error(typo, 400)["param"] == "expires_in"
    created = httpx.post(gw.url + "/admin/v1/keys", headers=h,
                         json={"client": "billing", "expires_in": "90d", "name": "prod"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert created.json()["scopes"] == ["chat", "models"]
    assert httpx.get(gw.url + "/v1/models", headers=bearer(key)).status_code == 200
    rotated = httpx.post(gw.url + f"/admin/v1/keys/{created.json()['id']}/rotate", headers=h,
                         json={"grace": "1h"})
    assert rotated.status_code == 201 and rotated.json()["previous"]["expires_at"] is not None
    shown = httpx.get(gw.url + "/admin/v1/clients/billing", headers=h).json()
    assert {k["id"] for k in shown["keys"]} == {created.json()["id"], rotated.json()["id"]}
    assert shown["budgets"]["day"]["used"] == 0
    listing = httpx.get(gw.url + "/admin/v1/keys", headers=h).text
    policies = httpx.get(gw.url + "/admin/v1/policies", headers=h).json()
    assert policies["version"] == 1 and "budgeted" in policies["policies"]
    revoked = httpx.post(gw.url + f"/admin/v1/keys/{created.json()['id']}/revoke", headers=h)
    assert revoked.json()["revoked_at"] is not None
    metrics = httpx.get(gw.url + "/metrics").text
    for secret in (key, rotated.json()["key"], admin_key):
        for text in (listing, str(shown), str(policies), metrics, logs.text()):
            # The random part (43 url-safe characters, which may contain '-' themselves).
            assert secret not in text and secret[len("sk-enc-") + 13:] not in text
    assert "digest" not in listing


def test_admin_and_client_keys_stay_in_their_lanes(gw: GatewayServer, admin_key: str) -> None:
    client_key = new_key(gw.settings, "lane", "default")
    assert_openai_error(
        httpx.get(gw.url + "/admin/v1/clients", headers=bearer(client_key)), 403)
    assert_openai_error(httpx.get(gw.url + "/v1/models", headers=bearer(admin_key)), 403)
    assert_openai_error(httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                                   headers=bearer(admin_key)), 403)
    assert_openai_error(httpx.get(gw.url + "/admin/v1/clients"), 401)
    mixed = cli(gw.settings, "clients", "create", "ops2", "--policy", "admin")
    assert mixed.returncode == 0
    both = cli(gw.settings, "keys", "create", "--client", "ops2", "--scopes", "admin,chat")
    assert both.returncode == 1


def test_a_bad_policy_reload_is_refused_and_the_old_one_stays(gw: GatewayServer,
                                                                admin_key: str) -> None:
    path = gw.settings.policies_file
    path.write_text(TEST_POLICIES.replace("version: 1", "version: 2")
                    .replace("[chat, models]", "[chat, modelz]"))
    resp = httpx.post(gw.url + "/admin/v1/policies/reload", headers=bearer(admin_key))
    err = assert_openai_error(resp, 400)
    assert err["code"] == "invalid_policy_file" and "modelz" in str(err["message"])
    assert httpx.get(gw.url + "/admin/v1/policies",
                     headers=bearer(admin_key)).json()["version"] == 1
    path.write_text(TEST_POLICIES.replace("version: 1", "version: 2"))
    time.sleep(1.2)  # picked up by the file watcher
    assert httpx.get(gw.url + "/admin/v1/policies",
                     headers=bearer(admin_key)).json()["version"] == 2


def test_the_requests_per_minute_limit_answers_429_with_retry_after(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "chatty", "limited")
    codes = [httpx.get(gw.url + "/v1/models", headers=bearer(key)).status_code for _ in range(60)]
    assert codes == [200] * 60
    # A sliding window counter: when the burst straddles a minute boundary the previous
    # minute's weight starts to decay, which can let one more in (the "+1 for a window edge").
    last = httpx.get(gw.url + "/v1/models", headers=bearer(key))
    if last.status_code == 200:
        last = httpx.get(gw.url + "/v1/models", headers=bearer(key))
    err = assert_openai_error(last, 429)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(last.headers["retry-after"]) <= 60
    assert 'enclave_rejections_total{client="chatty",reason="rate_requests"}' in httpx.get(
        gw.url + "/metrics").text


def test_two_gateway_processes_share_one_limit_through_redis(
        tmp_path: Path, redis_server: RedisServer) -> None:
    settings = gateway_settings(tmp_path, copy_manifests(tmp_path / "models"),
                                redis_url=redis_server.url)
    key = new_key(settings, "shared", "limited")
    gateways = [GatewayProcess(settings, settings_env(settings), tmp_path / f"gw{i}.log")
                for i in range(2)]
    try:
        for g in gateways:
            g.start()

        def hammer(url: str) -> list[int]:
            with httpx.Client(headers=bearer(key)) as client:
                return [client.get(url + "/v1/models").status_code for _ in range(50)]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(hammer, gateways[i % 2].url) for i in range(8)]
            codes = [c for f in futures for c in f.result()]
    finally:
        for g in gateways:
            g.stop()
    assert len(codes) == 400
    assert set(codes) == {200, 429}
    assert codes.count(200) <= 61  # 60 a minute across both gateways, +1 for a window edge
    assert codes.count(200) >= 55  # and the limit was actually reachable


def _settings_for(tmp: Path, **overrides: object) -> Settings:
    return gateway_settings(tmp, copy_manifests(tmp / "models"), **overrides)
