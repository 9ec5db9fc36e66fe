"""Draining an engine for patching: the admin API and hardening/patch-gpu-node.sh --dry-run
against the running gateway and real engines."""

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
    assert_openai_error,
    bearer,
    gateway_settings,
    new_key,
    settings_env,
)

pytestmark = pytest.mark.engine
DEPLOYMENT = "demo-chat-v1"
CHAT = {"model": "demo-chat", "max_tokens": 8,
        "messages": [{"role": "user", "content": "drain"}]}
# Long enough to be seen in flight while it runs: four sequences of 1500 tokens (a single one
# took under a second on an idle CPU engine, faster than the first admin calls answered).
LONG = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "n": 4}


@pytest.fixture(scope="module")
def gateway(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway process of its own: the in-thread one shares the test process's GIL with the
    polling loop and the request threads, which in full runs delayed its admin answers."""
    root = tmp_path_factory.mktemp("drain")
    settings = gateway_settings(root, engines.models_dir)
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


def _watch_a_long_request(gateway: GatewayProcess, admin_key: str,
                          api_key: str) -> tuple[int, dict[str, object], list[object]]:
    """Send LONG (not streamed) and poll the admin API until it shows it in flight."""
    done = threading.Event()
    outcome: dict[str, object] = {}

    def long_request() -> None:
        started = time.monotonic()
        with httpx.Client(timeout=120) as client:
            resp = client.post(f"{gateway.url}/v1/chat/completions", json=LONG,
                               headers=bearer(api_key))
        outcome.update(status=resp.status_code, seconds=time.monotonic() - started,
                       body=resp.text[:120])
        done.set()

    # One client for every poll: a new httpx client per call, beside the thread above, was
    # seen to wait seconds before it even connected (the gateway answered curl at once).
    with httpx.Client(timeout=10, headers=bearer(admin_key)) as polling:
        threading.Thread(target=long_request).start()
        seen, polls, t0 = 0, [], time.monotonic()
        while not done.is_set() and not seen:
            asked = time.monotonic()
            listed = polling.get(f"{gateway.url}/admin/v1/engines").json()["data"]
            seen = next(int(e["in_flight"]) for e in listed if e["deployment"] == DEPLOYMENT)
            polls.append((round(asked - t0, 2), round(time.monotonic() - asked, 2), seen))
            time.sleep(0.05)
    done.wait(120)
    return seen, outcome, polls


def test_a_non_streamed_request_counts_in_flight_while_it_generates(
        gateway: GatewayProcess, admin_key: str, api_key: str) -> None:
    """vLLM sends a non-streamed answer's headers only at the end: drain must see it before."""
    assert engines(gateway, admin_key)[DEPLOYMENT]["in_flight"] == 0
    # Seeing it is a race between the admin polls and the request on a 2-core machine: one
    # full run in several missed it once. Three tries; every missed one is reported.
    missed = []
    for _ in range(3):
        seen, outcome, polls = _watch_a_long_request(gateway, admin_key, api_key)
        if seen:
            break
        missed.append((outcome, polls))  # polls: (when asked, how long it took, in_flight)
    assert seen == 1, missed
    if missed:
        print(f"in flight seen after {len(missed)} missed tries: {missed}")
    assert engines(gateway, admin_key)[DEPLOYMENT]["in_flight"] == 0


def test_drain_needs_the_admin_scope_and_a_known_deployment(
        gateway: GatewayProcess, admin_key: str, api_key: str) -> None:
    url = f"{gateway.url}/admin/v1/engines/{DEPLOYMENT}/drain"
    assert_openai_error(httpx.post(url, headers=bearer(api_key), timeout=10), 403)
    assert_openai_error(httpx.post(url, timeout=10), 401)
    missing = httpx.post(f"{gateway.url}/admin/v1/engines/nope-v9/drain",
                         headers=bearer(admin_key), timeout=10)
    assert_openai_error(missing, 404)
    assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is False


def _long_stream(gateway: GatewayProcess, api_key: str, result: dict[str, object]) -> None:
    body = {**LONG, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers=bearer(api_key), timeout=120) as resp:
        text = "".join(resp.iter_text())
    result.update(status=resp.status_code, done="data: [DONE]" in text, finished=True,
                  text=text[-300:])


def test_patch_dry_run_drains_waits_for_in_flight_and_undrains(
        gateway: GatewayProcess, admin_key: str, api_key: str, undrained: None) -> None:
    assert engines(gateway, admin_key)[DEPLOYMENT]["in_flight"] == 0
    # Seeing the stream in flight races the admin polls on 2 loaded cores (full runs missed it
    # about one time in three); up to three streams, each miss reported.
    misses = []
    for _ in range(3):
        stream_result: dict[str, object] = {}
        streamer = threading.Thread(target=_long_stream, args=(gateway, api_key, stream_result))
        streamer.start()
        deadline = time.monotonic() + 30
        while engines(gateway, admin_key)[DEPLOYMENT]["in_flight"] == 0:
            if "finished" in stream_result:
                break
            assert time.monotonic() < deadline, (
                f"the stream never reached the engine: {engines(gateway, admin_key)[DEPLOYMENT]}")
            time.sleep(0.05)
        if "finished" not in stream_result:
            break
        misses.append(stream_result)
        streamer.join(timeout=120)
    assert "finished" not in stream_result, f"every stream ended unseen: {misses}"
    if misses:
        print(f"in flight seen after {len(misses)} missed streams")

    env = {**os.environ, "ENCLAVE_ADMIN_KEY": admin_key, "ENCLAVE_VERIFY_KEY": api_key,
           "ENCLAVE_DRIVER_PIN": "/nonexistent"}
    script = subprocess.Popen(
        ["bash", str(REPO / "hardening" / "patch-gpu-node.sh"), "--dry-run",
         "--gateway", gateway.url, "--deployment", DEPLOYMENT, "--timeout", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # While it waits, new requests are not sent to the drained engine. The script needs
        # a moment to start and call the admin API (longer on 2 loaded cores).
        deadline = time.monotonic() + 20
        while not engines(gateway, admin_key)[DEPLOYMENT]["draining"]:
            assert script.poll() is None or script.returncode == 0, script.communicate()[0]
            assert time.monotonic() < deadline, "the script did not drain the engine in 20 s"
            time.sleep(0.1)
        if "finished" in stream_result:  # ~5 s of generation: normally still going
            print("the stream ended before the drain was seen")
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT,
                             headers=bearer(api_key), timeout=60)
        assert refused.status_code == 503
        out, _ = script.communicate(timeout=300)
    finally:
        if script.poll() is None:  # a failed assertion above: never leave the script behind
            script.kill()
            script.communicate()
    streamer.join(timeout=120)

    assert script.returncode == 0, out
    assert stream_result["status"] == 200 and stream_result["done"], stream_result
    lines = out.splitlines()
    assert f"drained {DEPLOYMENT} on {gateway.url}" in lines
    assert f"in flight on {gateway.url}: 0" in lines
    # The script waits while the stream runs. On a loaded machine the stream can end between
    # the drain and the script's first count; the test above already proved it was seen.
    waited = any(line.startswith("waiting: 1 in flight") for line in lines)
    if not waited:
        print(f"the stream ended before the script's first count: {out}")
    assert "[dry-run] apt-get update -q" in lines  # package steps only printed
    assert "[dry-run] unattended-upgrade -v" in lines
    assert f"undrained {DEPLOYMENT} on {gateway.url}" in lines
    assert "inference ok" in lines
    # the undrain came after the stream had finished
    assert lines.index(f"in flight on {gateway.url}: 0") > lines.index(
        f"drained {DEPLOYMENT} on {gateway.url}")
    assert engines(gateway, admin_key)[DEPLOYMENT]["draining"] is False
