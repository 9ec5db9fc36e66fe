"""Two real replicas of demo-chat under steady mixed load (streamed and not, c=8): one killed,
one hung (SIGSTOP), one drained by its supervisor. The gateway is its own process following
the supervisor's control socket, with a 3-second first-byte timeout (short windows: the suite
shares these engines).

The peers' failures these guard against: vLLM production-stack routed to dead, terminating and
still-loading pods (#420, #601, #619, #656) and let one unresponsive backend hang every
request (#749); LiteLLM kept a dead host in rotation (#27362, PR #34836)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    REPO,
    Engines,
    GatewayProcess,
    bearer,
    gateway_settings,
    new_key,
    settings_env,
    wait_until,
)
from tests.support.load import Sent, p99, run_load

pytestmark = pytest.mark.engine
FIRST_BYTE_S = 3.0
R0, R1 = "demo-chat-v1/r0", "demo-chat-v1/r1"


@pytest.fixture(scope="module")
def gw(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("replicas")
    settings = gateway_settings(root, engines.models_dir)
    env = {**settings_env(settings), "ENCLAVE_SUPERVISOR_SOCKET": str(engines.socket),
           "ENCLAVE_UPSTREAM_FIRST_BYTE_TIMEOUT_S": str(FIRST_BYTE_S),
           "ENCLAVE_EJECTION_BASE_S": "1", "ENCLAVE_EJECTION_MAX_S": "4"}
    gateway = GatewayProcess(settings, env, root / "gateway.log").start()
    try:
        wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, 60)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def keys(gw: GatewayProcess) -> dict[str, str]:
    return {"api": new_key(gw.settings, "load", "default"),
            "admin": new_key(gw.settings, "operators", "admin")}


def replicas(gw: GatewayProcess, admin: str) -> dict[str, dict[str, object]]:
    resp = httpx.get(gw.url + "/admin/v1/engines", headers=bearer(admin), timeout=10)
    assert resp.status_code == 200
    return {r["replica"]: r for r in resp.json()["data"]}


def attempts(gw: GatewayProcess, replica: str, outcome: str | None = None) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "enclave_upstream_attempts_total"
                    and sample.labels.get("replica") == replica
                    and (outcome is None or sample.labels.get("outcome") == outcome)):
                total += sample.value
    return total


def both_ready(gw: GatewayProcess, engines: Engines, admin: str) -> None:
    wait_until(lambda: all(s["state"] == "healthy" for s in engines.state().values()), 300,
               what="every engine healthy")
    wait_until(lambda: all(r["state"] == "ready" for r in replicas(gw, admin).values()), 30,
               what="the gateway routing to every replica")


def summary(results: list[Sent]) -> str:
    bad = [r for r in results if not r.complete]
    return f"{len(results)} requests, {len(bad)} failed: " + "; ".join(
        f"{'stream' if r.stream else 'plain'} {r.status} {r.text[-160:]!r}" for r in bad[:5])


def test_a_hung_replica_loses_its_requests_within_the_first_byte_timeout(
        gw: GatewayProcess, engines: Engines, keys: dict[str, str]) -> None:
    both_ready(gw, engines, keys["admin"])
    pid = int(str(engines.state()[R1]["pid"]))
    marks: dict[str, float] = {}

    def stop() -> None:
        marks["stop"] = time.monotonic()
        os.kill(pid, signal.SIGSTOP)

    def cont() -> None:
        marks["cont"] = time.monotonic()
        os.kill(pid, signal.SIGCONT)

    try:
        results = run_load(gw.url, keys["api"], 14, events=[(4, stop), (10, cont)])
    finally:
        os.kill(pid, signal.SIGCONT)
    before = [r.duration for r in results if r.start + r.duration < marks["stop"]]
    during = [r for r in results if marks["stop"] <= r.start < marks["cont"]]
    assert before and during
    # Requests sent while it hangs: all answered, by the other replica once the hung one is
    # found out, so none waits much past the first-byte timeout.
    assert all(r.complete for r in during), summary(during)
    bound = FIRST_BYTE_S + 2 * p99(before) + 1.0
    assert p99([r.duration for r in during]) < bound, (p99([r.duration for r in during]), bound)
    # Only streams already relaying from the hung replica may end in an error event.
    for r in results:
        if not r.complete:
            assert r.stream and r.start < marks["stop"] and "engine_stream_broken" in r.text, r
    # After SIGCONT it is probed and comes back.
    served_before = attempts(gw, R1, "ok")
    wait_until(lambda: replicas(gw, keys["admin"])[R1]["state"] == "ready", 30,
               what="the replica back after SIGCONT")
    run_load(gw.url, keys["api"], 3, concurrency=4)
    assert attempts(gw, R1, "ok") > served_before


def test_a_drained_replica_stops_only_after_its_last_request_and_no_request_fails(
        gw: GatewayProcess, engines: Engines, keys: dict[str, str]) -> None:
    both_ready(gw, engines, keys["admin"])
    drained: dict[str, object] = {}

    def drain() -> None:
        out = subprocess.run(
            [sys.executable, "-m", "serving.cli.main", "engines", "drain", R1,
             "--deadline", "60"], env=engines.env, cwd=REPO, capture_output=True, text=True,
            timeout=120)
        drained.update(code=out.returncode, out=out.stdout + out.stderr, at=time.monotonic())

    results = run_load(gw.url, keys["api"], 12, events=[(3, drain)], max_tokens=48)
    assert drained["code"] == 0, drained
    assert "(idle)" in str(drained["out"]), drained  # stopped when it had nothing left
    assert all(r.complete for r in results), summary(results)
    state = engines.state()[R1]
    assert state["state"] == "held" and state["pid"] is None
    assert replicas(gw, keys["admin"])[R1]["state"] in ("down", "draining")
    started = subprocess.run(
        [sys.executable, "-m", "serving.cli.main", "engines", "start", R1], env=engines.env,
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    both_ready(gw, engines, keys["admin"])


def test_concurrent_duplicates_with_one_idempotency_key_run_and_charge_once(
        gw: GatewayProcess, engines: Engines, keys: dict[str, str]) -> None:
    both_ready(gw, engines, keys["admin"])
    key = new_key(gw.settings, "idempotent", "default")
    body = {"model": "demo-chat", "max_tokens": 24, "ignore_eos": True,
            "messages": [{"role": "user", "content": "charge me once"}]}
    headers = {**bearer(key), "Idempotency-Key": "order-7731"}
    before = engines.metric("demo-chat-v1", "vllm:request_success_total")

    async def twenty() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
            return list(await asyncio.gather(*(
                client.post("/v1/chat/completions", json=body, headers=headers)
                for _ in range(20))))

    answers = asyncio.run(twenty())
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
    assert len({a.content for a in answers}) == 1  # the one answer, replayed
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 19
    assert engines.metric("demo-chat-v1", "vllm:request_success_total") - before == 1
    usage = answers[0].json()["usage"]
    charged = 0.0
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        for sample in family.samples:
            if (sample.name == "enclave_client_tokens_total"
                    and sample.labels.get("client") == "idempotent"):
                charged += sample.value
    assert charged == usage["prompt_tokens"] + usage["completion_tokens"]
    # The same key with another body is refused; a stream cannot carry one.
    other = httpx.post(gw.url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={**body, "max_tokens": 8})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    stream = httpx.post(gw.url + "/v1/chat/completions", headers=headers, timeout=60,
                        json={**body, "stream": True})
    assert stream.status_code == 400


@pytest.mark.engine_restart
def test_a_killed_replica_fails_no_plain_request_and_gets_none_after_its_exit(
        gw: GatewayProcess, engines: Engines, keys: dict[str, str]) -> None:
    both_ready(gw, engines, keys["admin"])
    pid = int(str(engines.state()[R1]["pid"]))
    marks: dict[str, float] = {}

    def kill() -> None:
        marks["kill"] = time.monotonic()
        os.killpg(pid, signal.SIGKILL)

    def seen() -> None:  # the gateway knows of the exit: from here no attempt goes to r1
        wait_until(lambda: replicas(gw, keys["admin"])[R1]["state"] != "ready", 10, 0.05)
        marks["seen"] = time.monotonic()
        marks["attempts"] = attempts(gw, R1)

    results = run_load(gw.url, keys["api"], 12, events=[(4, kill), (4.2, seen)])
    assert marks["seen"] - marks["kill"] < 3, marks
    plain = [r for r in results if not r.stream]
    assert all(r.complete for r in plain), summary(plain)
    for r in results:
        if not r.complete:  # only streams that were relaying from r1 when it died
            assert r.stream and r.start < marks["kill"] and "engine_stream_broken" in r.text, r
    assert engines.state()[R1]["state"] != "healthy"  # not back yet
    assert attempts(gw, R1) == marks["attempts"]
    both_ready(gw, engines, keys["admin"])  # the supervisor restarted it; routed to again
