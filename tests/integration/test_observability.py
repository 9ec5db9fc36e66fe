"""Metrics count what happened, streamed or not; logs carry request ids and no secrets."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import GatewayServer, LogCapture

pytestmark = pytest.mark.engine
SECRET_PROMPT = "my card 4111-1111-1111-1111 and password hunter2"


def samples(gateway: GatewayServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(gateway.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def test_streamed_and_plain_tokens_are_all_counted(gateway: GatewayServer, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    before = samples(gateway)
    body = {"model": "demo-chat", "max_tokens": 11, "ignore_eos": True,
            "messages": [{"role": "user", "content": "count me"}]}
    plain = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).json()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=headers,
                      json={**body, "stream": True}) as resp:
        text = "".join(resp.iter_text())
    assert '"usage":{' not in text  # stripped: the client did not ask
    after = samples(gateway)
    completion = value(after, "enclave_completion_tokens_total", model="demo-chat") - value(
        before, "enclave_completion_tokens_total", model="demo-chat")
    prompt = value(after, "enclave_prompt_tokens_total", model="demo-chat") - value(
        before, "enclave_prompt_tokens_total", model="demo-chat")
    assert completion == 22
    assert prompt == 2 * plain["usage"]["prompt_tokens"]
    ok = value(after, "enclave_requests_total", endpoint="chat", model="demo-chat",
               status="200") - value(before, "enclave_requests_total", endpoint="chat",
                                     model="demo-chat", status="200")
    assert ok == 2
    assert value(after, "enclave_time_to_first_token_seconds_count", model="demo-chat") >= 1
    assert value(after, "enclave_engine_up", model="demo-chat", deployment="demo-chat-v1") == 1


def test_client_chosen_model_names_never_become_labels(gateway: GatewayServer,
                                                       api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for i in range(3):
        httpx.post(gateway.url + "/v1/chat/completions", headers=headers,
                   json={"model": f"attacker-{i}", "messages": [{"role": "user", "content": "x"}]})
    text = httpx.get(gateway.url + "/metrics").text
    assert "attacker-" not in text
    assert 'model="unknown",status="404"' in text


def test_no_key_or_prompt_in_logs_or_metrics(gateway: GatewayServer, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "X-Request-ID": "obs-req-1"}
    body = {"model": "demo-chat", "max_tokens": 3,
            "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    with LogCapture() as capture:
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)
        httpx.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True},
                   headers=headers)
        httpx.post(gateway.url + "/v1/chat/completions", json={**body, "temperature": -1},
                   headers=headers)
        # The line is written once the response is sent, so just after the client has it.
        deadline = time.monotonic() + 5
        while sum('"msg":"request"' in line for line in capture.lines) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert resp.headers["x-request-id"] == "obs-req-1"
    logs = capture.text()
    metrics = httpx.get(gateway.url + "/metrics").text
    for haystack in (logs, metrics):
        assert api_key not in haystack and api_key[20:] not in haystack
        assert "4111-1111" not in haystack and "hunter2" not in haystack
    request_lines = [line for line in capture.lines if '"msg":"request"' in line]
    assert len(request_lines) == 3
    assert all('"request_id":"obs-req-1"' in line for line in request_lines)
    assert all('"key_id":"' in line for line in request_lines)
