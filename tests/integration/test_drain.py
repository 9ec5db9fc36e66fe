"""Draining an engine for patching: the admin API and hardening/patch-gpu-node.sh --dry-run
against the running gateway and real engines.

The gateway reaches demo-chat through a relay that can hold an engine's answer back: a request
then stays in flight for as long as the test needs, deterministically. (Waiting for a long
generation to be seen in flight raced the machine: while a CPU engine generates at full speed
on two cores, other processes, the test's own polls among them, can stall for seconds.)"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import (
    REPO,
    Engines,
    GatewayProcess,
    RecordingProxy,
    assert_openai_error,
    bearer,
    copy_manifests,
    gateway_settings,
    new_key,
    settings_env,
    wait_until,
)

pytestmark = pytest.mark.engine
DEPLOYMENT = "demo-chat-v1"
CHAT = {"model": "demo-chat", "max_tokens": 8,
        "messages": [{"role": "user", "content": "drain"}]}
HELD = {**CHAT, "max_tokens": 16}


@pytest.fixture(scope="module")
def relay(engines: Engines) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(int(str(engines.state()[f"{DEPLOYMENT}/r0"]["port"]))).start()
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.stop()


@pytest.fixture(scope="module")
def gateway(engines: Engines, relay: RecordingProxy,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway process of its own (as operators run it), reaching demo-chat through the
    relay."""
    root = tmp_path_factory.mktemp("drain")
    models = copy_manifests(root / "models", ports={"demo-chat": relay.port},
                            replicas={"demo-chat": 1})
    for manifest in models.glob("*.yaml"):  # the other models: the engines' own ports
        if manifest.stem != "demo-chat":
            manifest.write_text((engines.models_dir / manifest.name).read_text())
    settings = gateway_settings(root, models)
    gw = GatewayProcess(settings, settings_env(settings), root / "gateway.log").start()
    try:
        deadline = time.monotonic() + 60  # its engines healthy in its own view
        while httpx.get(gw.url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway never saw its engines healthy"
            time.sleep(0.2)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def api_key(gateway: GatewayProcess) -> str:
    return new_key(gateway.settings, "tests")


@pytest.fixture(scope="module")
def admin_key(gateway: GatewayProcess) -> str:
    return new_key(gateway.settings, "operators", "admin")


@pytest.fixture
def undrained(gateway: GatewayProcess, admin_key: str) -> Iterator[None]:
    yield
    httpx.post(f"{gateway.url}/admin/v1/engines/{DEPLOYMENT}/undrain",
               headers=bearer(admin_key), timeout=10)


def engines(gateway: GatewayProcess, admin_key: str) -> dict[str, dict[str, object]]:
    resp = httpx.get(f"{gateway.url}/admin/v1/engines", headers=bearer(admin_key), timeout=10)
    assert resp.status_code == 200
    return {e["deployment"]: e for e in resp.json()["data"]}


def test_a_drained_engine_gets_no_new_requests_until_undrained(
        gateway: GatewayProcess, admin_key: str, api_key: str, undrained: None) -> None:
    drained = httpx.post(f"{gateway.url}/admin/v1/engines/{DEPLOYMENT}/drain",
                         headers=bearer(admin_key), timeout=10)
    assert drained.status_code == 200 and drained.json()["draining"] is True
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT,
                         headers=bearer(api_key), timeout=60)
    assert_openai_error(refused, 503)
    assert refused.headers["retry-after"]
    assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is True
    assert "enclave_engine_draining{" in httpx.get(gateway.url + "/metrics").text
    back = httpx.post(f"{gateway.url}/admin/v1/engines/{DEPLOYMENT}/undrain",
                      headers=bearer(admin_key), timeout=10)
    assert back.status_code == 200 and back.json()["draining"] is False
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT,
                      headers=bearer(api_key), timeout=60).status_code == 200


def _in_flight(gateway: GatewayProcess, admin_key: str) -> int:
    return int(str(engines(gateway, admin_key)[DEPLOYMENT]["in_flight"]))


def _send(gateway: GatewayProcess, api_key: str, body: dict[str, object],
          result: dict[str, object]) -> threading.Thread:
    """``body`` to the chat endpoint from a thread; ``result`` gets the status and the text."""

    def run() -> None:
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", f"{gateway.url}/v1/chat/completions", json=body,
                headers=bearer(api_key)) as resp:
            text = "".join(resp.iter_text())
        result.update(status=resp.status_code, done="data: [DONE]" in text, text=text[-300:])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_non_streamed_request_counts_in_flight_while_it_generates(
        gateway: GatewayProcess, relay: RecordingProxy, admin_key: str, api_key: str) -> None:
    """vLLM sends a non-streamed answer's headers only at the end: drain must see it before."""
    assert _in_flight(gateway, admin_key) == 0
    relay.hold()  # the answer is held back: the request is in flight until released
    result: dict[str, object] = {}
    try:
        sender = _send(gateway, api_key, HELD, result)
        wait_until(lambda: _in_flight(gateway, admin_key) == 1, 60, 0.1,
                   what="the request in flight")
        assert "status" not in result
    finally:
        relay.release()
    sender.join(timeout=120)
    assert result["status"] == 200, result
    wait_until(lambda: _in_flight(gateway, admin_key) == 0, 10, 0.1, what="in flight back to 0")


def test_drain_needs_the_admin_scope_and_a_known_deployment(
        gateway: GatewayProcess, admin_key: str, api_key: str) -> None:
    url = f"{gateway.url}/admin/v1/engines/{DEPLOYMENT}/drain"
    assert_openai_error(httpx.post(url, headers=bearer(api_key), timeout=10), 403)
    assert_openai_error(httpx.post(url, timeout=10), 401)
    missing = httpx.post(f"{gateway.url}/admin/v1/engines/nope-v9/drain",
                         headers=bearer(admin_key), timeout=10)
    assert_openai_error(missing, 404)
    assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is False


def test_patch_dry_run_drains_waits_for_in_flight_and_undrains(
        gateway: GatewayProcess, relay: RecordingProxy, admin_key: str, api_key: str,
        undrained: None) -> None:
    assert _in_flight(gateway, admin_key) == 0
    relay.hold()  # a stream in flight for as long as the drain must wait for it
    stream_result: dict[str, object] = {}
    streamer = _send(gateway, api_key, {**HELD, "stream": True}, stream_result)
    try:
        wait_until(lambda: _in_flight(gateway, admin_key) == 1, 60, 0.1,
                   what="the stream in flight")
    except AssertionError:
        relay.release()
        raise

    env = {**os.environ, "ENCLAVE_ADMIN_KEY": admin_key, "ENCLAVE_VERIFY_KEY": api_key,
           "ENCLAVE_DRIVER_PIN": "/nonexistent"}
    script = subprocess.Popen(
        ["bash", str(REPO / "hardening" / "patch-gpu-node.sh"), "--dry-run",
         "--gateway", gateway.url, "--deployment", DEPLOYMENT, "--timeout", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        # The script drains, then counts what is in flight: the held stream, until released.
        assert script.stdout is not None
        for line in script.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(f"waiting: 1 in flight on {gateway.url}"):
                break
        assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is True, lines
        # While it waits, new requests are not sent to the drained engine.
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT,
                             headers=bearer(api_key), timeout=60)
        assert refused.status_code == 503
        assert "status" not in stream_result  # still held, still in flight
        relay.release()
        rest, _ = script.communicate(timeout=300)
        lines += rest.splitlines()
    finally:
        relay.release()
        if script.poll() is None:  # a failed assertion above: never leave the script behind
            script.kill()
            script.communicate()
    streamer.join(timeout=120)
    out = "\n".join(lines)

    assert script.returncode == 0, out
    assert stream_result["status"] == 200 and stream_result["done"], stream_result
    assert f"drained {DEPLOYMENT} on {gateway.url}" in lines
    assert f"in flight on {gateway.url}: 0" in lines
    assert lines.index(f"waiting: 1 in flight on {gateway.url}") < lines.index(
        f"in flight on {gateway.url}: 0")
    assert "[dry-run] apt-get update -q" in lines  # package steps only printed
    assert "[dry-run] unattended-upgrade -v" in lines
    assert f"undrained {DEPLOYMENT} on {gateway.url}" in lines
    assert "inference ok" in lines
    # the undrain came after the stream had finished
    assert lines.index(f"in flight on {gateway.url}: 0") > lines.index(
        f"drained {DEPLOYMENT} on {gateway.url}")
    assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is False
