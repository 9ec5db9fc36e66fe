"""The real vLLM engines for the integration tests: the engine supervisor (``enclave engines
run``) as its own process, as in production, started once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from serving.settings import Settings
from tests.support.gateway import REPO, TEST_PEPPER, copy_manifests, stop_process

ENGINE_START_TIMEOUT_S = 900
CHAT_REPLICAS = 2


class Engines:
    """The engine supervisor (``enclave engines run``) as its own process, as in production."""

    def __init__(self, root: Path, replicas: dict[str, int] | None = None,
                 only: set[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        # Two replicas of the chat model: the router, failures and drains are tested on them.
        self.models_dir = copy_manifests(root / "models",
                                         replicas=replicas or {"demo-chat": CHAT_REPLICAS})
        for path in self.models_dir.glob("*.yaml"):
            if only is not None and path.stem not in only:
                path.unlink()
        self.data_dir = root / "engines-data"
        self.log_path = root / "supervisor.log"
        self.env = {**os.environ, "ENCLAVE_MODELS_DIR": str(self.models_dir),
                    "ENCLAVE_DATA_DIR": str(self.data_dir), "ENCLAVE_PEPPER": TEST_PEPPER,
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving.cli.main", "engines", "run"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited:\n{self.log_path.read_text()[-4000:]}")
            states = self.state()
            if states and all(s["state"] == "healthy" for s in states.values()):
                self.warm_up()
                return
            time.sleep(1)
        raise RuntimeError(f"engines not healthy in time:\n{self.log_path.read_text()[-4000:]}")

    def warm_up(self) -> None:
        """One request per engine: the first one after start compiles kernels for a while."""
        for info in self.state().values():
            if info["model"] == "demo-chat":
                body = {"model": "demo-chat", "max_tokens": 64, "ignore_eos": True,
                        "messages": [{"role": "user", "content": "warm up"}]}
                httpx.post(f"{info['url']}/v1/chat/completions", json=body, timeout=120)
            else:
                httpx.post(f"{info['url']}/v1/embeddings", timeout=120,
                           json={"model": info["model"], "input": "warm up"})

    def state(self) -> dict[str, dict[str, object]]:
        try:
            data: dict[str, dict[str, object]] = json.loads(
                (self.data_dir / "run" / "engines.json").read_text())
            return data
        except (OSError, ValueError):
            return {}

    @property
    def socket(self) -> Path:
        """The supervisor's events socket (gateways follow its replica events)."""
        return self.data_dir / "run" / "events.sock"

    def url(self, replica: str) -> str:
        return str(self.state()[replica]["url"])

    def replicas(self, deployment: str) -> list[str]:
        return sorted(name for name, info in self.state().items()
                      if info["deployment"] == deployment)

    def metric(self, deployment: str, name: str, **labels: str) -> float:
        """Sum of a vLLM metric's samples (matching ``labels``) over the deployment's replicas
        (or one replica, named), read from the engines themselves."""
        targets = [deployment] if "/" in deployment else self.replicas(deployment)
        total = 0.0
        for replica in targets:
            text = httpx.get(self.url(replica) + "/metrics", timeout=30).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v
                                                   for k, v in labels.items()):
                        total += sample.value
        return total

    def stop(self) -> None:
        stop_process(self.proc, 60)

    @property
    def env_dir(self) -> Path:
        """The engine environment (vLLM) the supervisor runs engines from."""
        return Settings(pepper=SecretStr(TEST_PEPPER)).engine_env_dir
