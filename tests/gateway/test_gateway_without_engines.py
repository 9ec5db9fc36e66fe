"""The gateway on a real server with no engine running: everything that must not need one."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.auth.keys import PREFIX
from tests.support import (
    GatewayServer,
    LogCapture,
    assert_openai_error,
    cli,
    engineless_gateway,
    new_key,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    yield from engineless_gateway(tmp_path_factory, "gw-no-engines", max_body_bytes=4096,
                                  retry_after_s=7)


@pytest.fixture(scope="module")
def key(gw: GatewayServer) -> str:
    return new_key(gw.settings, "unit")


CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def test_liveness_answers_and_readiness_says_no_engine(gw: GatewayServer) -> None:
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["models"] == {"demo-chat": False, "minilm-embed": False}


def test_a_dead_engine_gives_503_with_retry_after(gw: GatewayServer, key: str) -> None:
    resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                      headers={"Authorization": f"Bearer {key}"})
    assert assert_openai_error(resp, 503)["code"] == "engine_unavailable"
    assert resp.headers["retry-after"] == "7"


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sk-enc-nope",
                                    f"Bearer {PREFIX}0123456789ab-" + "x" * 43])
def test_missing_or_wrong_keys_get_401_without_echo(gw: GatewayServer, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert assert_openai_error(resp, 401)["code"] == "invalid_api_key"
    assert resp.headers["www-authenticate"] == "Bearer"
    presented = header.split(" ", 1)[-1] if header and " " in header else None
    if presented:
        assert presented not in resp.text


def test_auth_comes_before_anything_about_the_body(gw: GatewayServer) -> None:
    resp = httpx.post(gw.url + "/v1/chat/completions", content=b"x" * 10_000)
    assert resp.status_code == 401


def test_oversized_body_is_413(gw: GatewayServer, key: str) -> None:
    resp = httpx.post(gw.url + "/v1/chat/completions", content=b"{" + b" " * 5000 + b"}",
                      headers={"Authorization": f"Bearer {key}"})
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"


def test_oversized_chunked_body_without_length_is_413(gw: GatewayServer, key: str) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    resp = httpx.post(gw.url + "/v1/chat/completions", content=body(),
                      headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(resp, 413)


def test_unknown_paths_and_engine_control_endpoints_are_404(gw: GatewayServer, key: str) -> None:
    for path in ("/pause", "/resume", "/v1/load_lora_adapter", "/collective_rpc",
                 "/update_weights", "/sleep", "/v1/chat/completions/../../pause", "/tokenize"):
        resp = httpx.post(gw.url + path, json={}, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 404, path
        assert resp.json()["error"]["code"] == "not_found"


def test_wrong_method_is_405_openai_shaped(gw: GatewayServer, key: str) -> None:
    resp = httpx.get(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(resp, 405)


def test_request_id_is_taken_from_the_client_or_made(gw: GatewayServer) -> None:
    resp = httpx.get(gw.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    made = httpx.get(gw.url + "/healthz").headers["x-request-id"]
    assert len(made) == 32
    bad = httpx.get(gw.url + "/healthz", headers={"X-Request-ID": "a b\tc"}).headers
    assert bad["x-request-id"] != "a b\tc"


def test_models_lists_the_manifests(gw: GatewayServer, key: str) -> None:
    resp = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert [m["id"] for m in resp.json()["data"]] == ["demo-chat", "minilm-embed"]


def test_cli_lists_keys_without_secrets_and_revokes(gw: GatewayServer, tmp_path: Path) -> None:
    created = cli(gw.settings, "keys", "create", "--client", "unit", "--name", "to-revoke")
    key = created.stdout.strip()
    assert key.startswith(PREFIX)
    listing = cli(gw.settings, "keys", "list")
    assert "to-revoke" in listing.stdout
    assert key not in listing.stdout and key[20:] not in listing.stdout
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 200
    assert cli(gw.settings, "keys", "revoke", "to-revoke").returncode == 0
    deadline = time.monotonic() + 5
    while httpx.get(gw.url + "/v1/models", headers=headers).status_code == 200:
        assert time.monotonic() < deadline, "revocation not seen within 5 s"
        time.sleep(0.1)
    assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 401
    assert cli(gw.settings, "keys", "revoke", "to-revoke").returncode == 1


def test_logs_hold_request_ids_and_never_keys(gw: GatewayServer, key: str) -> None:
    with LogCapture() as capture:
        httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                   headers={"Authorization": f"Bearer {key}", "X-Request-ID": "log-test-1"})
        httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                   headers={"Authorization": "Bearer " + key[:-2] + "zz"})
        # The line is written once the response is sent, so just after the client has it.
        deadline = time.monotonic() + 5
        while sum('"msg":"request"' in line for line in capture.lines) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    text = capture.text()
    assert "log-test-1" in text
    assert key[20:] not in text and key[:-2] not in text
    assert "hi" not in [w.strip('",') for w in text.split()]
