"""The whole monitoring stack against the running platform: a real Prometheus (Debian package)
scrapes the gateway, the real vLLM engines, the GPU exporter (over a FAKE NVML: no GPU here) and
the node exporter, with the shipped rules; every name the rules and dashboards use exists, every
rule evaluates, every dashboard query parses, and PromQL counts the traffic sent."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.monitoring import (
    PROMETHEUS,
    RULE_FILES,
    alerts,
    dashboard_exprs,
    grafana_to_promql,
    recorded,
    tool,
    used_names,
)
from tests.support import REPO, Engines, GatewayServer, bearer, free_port, new_key, stop_process

pytestmark = pytest.mark.engine


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except httpx.TransportError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Prometheus:
    def __init__(self, root: Path, targets: dict[str, list[tuple[str, dict[str, str]]]]) -> None:
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(p) for p in RULE_FILES]
        for job in config["scrape_configs"]:
            job.pop("scrape_interval", None)
            job["static_configs"] = [{"targets": [t], "labels": labels}
                                     for t, labels in targets[job["job_name"]]]
        self.config = root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config}",
                 f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        wait_for("prometheus", lambda: httpx.get(f"http://127.0.0.1:{self.port}/-/ready")
                 .status_code == 200, 30)

    def get(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.api}/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def scalar(self, query: str) -> float | None:
        result = self.get("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None


def host_port(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


@pytest.fixture(scope="module")
def stack(engines: Engines, gateway: GatewayServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    root = tmp_path_factory.mktemp("monitoring")
    exporter_port, node_port = free_port(), free_port()
    procs = []
    with (root / "exporter.log").open("wb") as log:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "monitoring.exporter", "--port", str(exporter_port),
             "--fake-gpus", "2", "--engines-file", str(engines.data_dir / "run" / "engines.json")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [tool("prometheus-node-exporter"), f"--web.listen-address=127.0.0.1:{node_port}"],
            stdout=log, stderr=subprocess.STDOUT))
    targets = {
        "enclave-gateway": [(host_port(gateway.url), {})],
        "vllm": [(host_port(engines.url(name)), {"deployment": name})
                 for name in engines.state()],
        "gpu": [(f"127.0.0.1:{exporter_port}", {})],
        "node": [(f"127.0.0.1:{node_port}", {})],
    }
    prom = Prometheus(root, targets)
    try:
        yield prom
    finally:
        stop_process(prom.proc, 10)
        for proc in procs:
            stop_process(proc, 10)


def gateway_requests(gateway: GatewayServer) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("enclave_requests_total{"))


def send_traffic(gateway: GatewayServer, key: str, admin_key: str) -> int:
    """Plain, streamed, abandoned and refused requests: every gateway series gets a sample."""
    url, headers = gateway.url + "/v1", bearer(key)
    chat = {"model": "demo-chat", "max_tokens": 8,
            "messages": [{"role": "user", "content": "monitoring"}]}
    sent = 0
    for _ in range(3):
        assert httpx.post(url + "/chat/completions", json=chat, headers=headers,
                          timeout=60).status_code == 200
        sent += 1
    for _ in range(2):
        with httpx.stream("POST", url + "/chat/completions", headers=headers, timeout=60,
                          json={**chat, "stream": True}) as resp:
            assert resp.status_code == 200
            resp.read()
        sent += 1
    with httpx.stream("POST", url + "/chat/completions", headers=headers, timeout=60,
                      json={**chat, "stream": True, "max_tokens": 400,
                            "ignore_eos": True}) as resp:
        next(resp.iter_bytes())  # then hang up mid-stream
    sent += 1
    assert httpx.post(url + "/embeddings", headers=headers, timeout=60,
                      json={"model": "minilm-embed", "input": "monitoring"}).status_code == 200
    sent += 1
    refused = httpx.post(url + "/chat/completions", json=chat, headers=bearer(admin_key),
                         timeout=60)
    assert refused.status_code == 403  # an admin key never reaches a model
    return sent + 1


def test_prometheus_sees_the_platform_and_every_name_rules_and_dashboards_use(
        stack: Prometheus, gateway: GatewayServer) -> None:
    key = new_key(gateway.settings, "monitoring")
    admin_key = new_key(gateway.settings, "monitoring-admin", "admin")
    before = gateway_requests(gateway)
    wait_for("Prometheus to hold the gateway's count",
             lambda: stack.scalar("sum(enclave_requests_total) or vector(0)") == before)

    sent = send_traffic(gateway, key, admin_key)

    # the traffic sent, counted by PromQL over the gateway's request counter
    assert gateway_requests(gateway) - before == sent
    wait_for(f"PromQL to count {sent} more requests",
             lambda: stack.scalar("sum(enclave_requests_total)") == before + sent, 30)
    assert stack.scalar('sum(enclave_requests_total{endpoint="chat",status="403"})') >= 1

    # every target up, the node exporter included
    targets = stack.get("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"enclave-gateway", "vllm", "gpu", "node"}
    wait_for("every target up", lambda: all(
        t["health"] == "up" for t in stack.get("targets")["activeTargets"]), 30)

    # every name the rules and dashboards use is exposed by what runs (GPU names: fake NVML)
    names = set(stack.get("label/__name__/values"))
    missing = sorted(used_names() - names)
    assert not missing, missing

    # every rule evaluates without error, and the recordings that traffic feeds have values
    def rules_evaluated() -> list[dict[str, Any]]:
        found = [r for g in stack.get("rules")["groups"] for r in g["rules"]]
        # never evaluated: "0001-01-01T00:00:00Z"
        return found if all(r["lastEvaluation"] > "2000" for r in found) else []
    evaluated = wait_for("the rules to be evaluated", rules_evaluated, 30)
    assert len(evaluated) == len(recorded()) + len(alerts())
    broken = {r["name"]: r.get("lastError") for r in evaluated if r["health"] != "ok"}
    assert not broken, broken
    for series in ("enclave:requests:rate5m", "enclave:gpu_up:sum_by_host",
                   "enclave:vllm_kv_cache_usage:max", "enclave:gpu_memory_by_deployment:bytes"):
        wait_for(f"{series} recorded", lambda s=series: stack.scalar(f"count({s})"), 30)
    assert stack.scalar("sum(enclave:gpu_up:sum_by_host)") == 2

    # every dashboard query is valid PromQL once Grafana's variables are filled in
    for expr in dashboard_exprs():
        stack.get("query", query=grafana_to_promql(expr))
