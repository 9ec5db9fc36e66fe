"""`enclave gateway --workers N`: several processes on one port, with rate limits, metrics and
the audit trail as exact as with one."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.bench.stores import RedisServer
from serving.bench.targets import free_port
from tests.support import (
    REPO,
    GatewayProcess,
    bearer,
    copy_manifests,
    gateway_settings,
    new_key,
    settings_env,
    wait_until,
)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
            ) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("workers")
    settings = gateway_settings(root, copy_manifests(root / "models"), redis_url=redis_server.url)
    gw = GatewayProcess(settings, settings_env(settings), root / "gw.log", workers=2).start()
    try:
        yield gw
    finally:
        gw.stop()


def test_two_workers_share_one_limit_and_one_set_of_metrics(workers: GatewayProcess) -> None:
    assert workers.proc is not None
    assert len(_children(workers.proc.pid)) == 2
    key = new_key(workers.settings, "w-limited", "limited")  # 60 requests a minute

    def hammer(_: int) -> list[int]:
        codes = []
        for _ in range(20):  # a new connection each time: the kernel spreads them
            codes.append(httpx.get(workers.url + "/v1/models", headers=bearer(key)).status_code)
        return codes

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = [c for batch in pool.map(hammer, range(6)) for c in batch]
    assert set(codes) == {200, 429}
    assert 55 <= codes.count(200) <= 61  # the limit, across both workers

    text = httpx.get(workers.url + "/metrics").text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith('enclave_requests_total{endpoint="models"'))
    assert served == len(codes)  # every worker's requests, whichever worker was scraped
    rejected = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("enclave_rejections_total"))
    assert rejected == codes.count(429)


def test_each_worker_writes_its_own_audit_chain(workers: GatewayProcess) -> None:
    key = new_key(workers.settings, "w-audit", "chat-only")
    audit = workers.settings.resolved_audit_dir
    for _ in range(200):  # each on a new connection, until both workers have served one
        # (refused by the engine-less upstream: audited all the same)
        httpx.post(workers.url + "/v1/chat/completions", headers=bearer(key), json={
            "model": "demo-chat", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        if audit.is_dir() and len(list(audit.iterdir())) == 2:
            break
    chains = sorted(p.name for p in audit.iterdir())
    assert [c.rsplit("-", 1)[1] for c in chains] == ["w0", "w1"]
    result = subprocess.run([sys.executable, "-m", "serving.cli.main", "audit", "verify"],
                            env=settings_env(workers.settings), cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_worker_that_dies_is_replaced(workers: GatewayProcess) -> None:
    assert workers.proc is not None
    first = _children(workers.proc.pid)
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(_children(workers.proc.pid)) == 2  # type: ignore[union-attr]
               and first[0] not in _children(workers.proc.pid),  # type: ignore[union-attr]
               15, what="a new worker")
    key = new_key(workers.settings, "w-after", "chat-only")
    wait_until(lambda: all(httpx.get(workers.url + "/v1/models", headers=bearer(key))
                           .status_code == 200 for _ in range(10)), 15, what="serving again")


def test_sigterm_stops_every_worker(tmp_path: Path, redis_server: RedisServer) -> None:
    settings = gateway_settings(tmp_path, copy_manifests(tmp_path / "models"),
                                redis_url=redis_server.url)
    gw = GatewayProcess(settings, settings_env(settings), tmp_path / "gw.log", workers=2).start()
    assert gw.proc is not None
    children = _children(gw.proc.pid)
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]


def test_workers_without_redis_are_refused(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path, copy_manifests(tmp_path / "models"))
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli.main", "gateway", "--workers", "2"],
        env=settings_env(settings), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ENCLAVE_REDIS_URL" in result.stderr + result.stdout


def test_workers_take_the_port_given_and_die_with_their_parent(
        tmp_path: Path, redis_server: RedisServer) -> None:
    settings = gateway_settings(tmp_path, copy_manifests(tmp_path / "models"),
                                redis_url=redis_server.url)
    port = free_port()
    env = {k: v for k, v in settings_env(settings).items() if k != "ENCLAVE_PORT"}
    with (tmp_path / "gw.log").open("wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "serving.cli.main", "gateway", "--workers", "2",
             "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}"), 60, what="workers up")
        chains = sorted(p.name for p in settings.resolved_audit_dir.iterdir())
        assert [c.rsplit("-", 2)[1:] for c in chains] == [[str(port), "w0"], [str(port), "w1"]]
        children = _children(parent.pid)
        parent.kill()  # SIGKILL: no chance to stop its workers
        parent.wait(timeout=10)
        wait_until(lambda: not any(_alive(pid) for pid in children), 20,
                   what="workers gone with their parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()
