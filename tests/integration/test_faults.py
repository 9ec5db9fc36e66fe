"""Slow and dead engines: 504 for too slow, 503 + Retry-After while dead, recovery without a
gateway restart."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Engines, GatewayServer, gateway_settings, new_key, running_gateway

pytestmark = pytest.mark.engine
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def impatient_gateway(engines: Engines, tmp_path: Path) -> Iterator[GatewayServer]:
    settings = gateway_settings(tmp_path, engines.models_dir, upstream_read_timeout_s=0.3)
    with running_gateway(settings) as gw:
        yield gw


def test_an_engine_too_slow_gives_504(impatient_gateway: GatewayServer) -> None:

    key = new_key(impatient_gateway.settings, "t")
    resp = httpx.post(impatient_gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}"},
                      json={**CHAT, "max_tokens": 2000, "ignore_eos": True})
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "engine_timeout"


@pytest.mark.engine_restart
def test_a_model_with_its_only_replica_killed_gives_503_then_recovers(
        gateway: GatewayServer, engines: Engines, api_key: str) -> None:
    """minilm-embed has one replica: while it is down the model answers 503 + Retry-After
    (chat, on its own replicas, is untouched), and it comes back without a gateway restart."""
    headers = {"Authorization": f"Bearer {api_key}"}
    url = gateway.url + "/v1/embeddings"
    body = {"model": "minilm-embed", "input": "hello"}
    assert httpx.post(url, json=body, headers=headers).status_code == 200
    before = engines.state()["minilm-embed-v1/r0"]
    os.kill(int(str(before["pid"])), signal.SIGKILL)

    deadline = time.monotonic() + 5
    while True:
        resp = httpx.post(url, json=body, headers=headers, timeout=10)
        if resp.status_code == 503:
            break
        assert time.monotonic() < deadline, f"still {resp.status_code} after the kill"
        time.sleep(0.05)
    assert int(resp.headers["retry-after"]) > 0
    assert resp.json()["error"]["code"] == "engine_unavailable"
    chat = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, json=CHAT)
    assert chat.status_code == 200

    deadline = time.monotonic() + 300
    while httpx.post(url, json=body, headers=headers, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(1)
    after = engines.state()["minilm-embed-v1/r0"]
    assert after["pid"] != before["pid"]
    assert after["restarts"] == int(str(before["restarts"])) + 1
    assert "SIGKILL" in str(after["last_exit"])
