"""Nothing but the allowlisted endpoints reaches an engine through the gateway."""

from __future__ import annotations

import httpx
import pytest

from tests.support import GatewayServer

pytestmark = pytest.mark.engine
CONTROL = ["/pause", "/resume", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
           "/collective_rpc", "/update_weights", "/sleep", "/wake_up", "/reset_prefix_cache",
           "/start_profile", "/scale_elastic_ep", "/tokenize", "/v1/responses", "/invocations"]


def test_engine_control_endpoints_are_unreachable_and_the_engine_keeps_serving(
        gateway: GatewayServer, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for path in CONTROL:
        for method in ("POST", "GET"):
            resp = httpx.request(method, gateway.url + path, headers=headers,
                                 json={"lora_name": "x", "lora_path": "/tmp"})
            assert resp.status_code == 404, (method, path, resp.text)
    # Query strings and path tricks do not choose the upstream path either.
    resp = httpx.post(gateway.url + "/v1/chat/completions?path=/pause", headers=headers,
                      json={"model": "demo-chat", "max_tokens": 3,
                            "messages": [{"role": "user", "content": "still there?"}]})
    assert resp.status_code == 200
