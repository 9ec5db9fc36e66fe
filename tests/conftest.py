"""Fixtures. The real vLLM engines start once per session (``engines``); gateways are cheap and
start per test or per module with the settings a test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from serving.bench.servers import PostgresServer, RedisServer
from serving.settings import Settings
from tests.support import (
    REPO,
    TEST_PEPPER,
    GatewayServer,
    copy_manifests,
    free_port,
    running_gateway,
    stop_process,
    write_policies,
)

ENGINE_START_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that kill an engine run last, so the others never wait for a restart.
    items.sort(key=lambda item: 1 if item.get_closest_marker("engine_restart") else 0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine_restart: kills an engine; runs last")


class Engines:
    """The engine supervisor (``enclave engines run``) as its own process, as in production."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models_dir = copy_manifests(root / "models")
        self.data_dir = root / "engines-data"
        self.log_path = root / "supervisor.log"
        self.env = {**os.environ, "ENCLAVE_MODELS_DIR": str(self.models_dir),
                    "ENCLAVE_DATA_DIR": str(self.data_dir), "ENCLAVE_PEPPER": TEST_PEPPER}
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

    def url(self, deployment: str) -> str:
        return str(self.state()[deployment]["url"])

    def metric(self, deployment: str, name: str, **labels: str) -> float:
        """Sum of a vLLM metric's samples (matching ``labels``), read from the engine itself."""
        text = httpx.get(self.url(deployment) + "/metrics", timeout=30).text
        total = 0.0
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


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    cluster = Engines(tmp_path_factory.mktemp("engines"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def gateway_settings(root: Path, models_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": root, "models_dir": models_dir, "port": free_port(),
        "pepper": SecretStr(TEST_PEPPER), "engine_health_interval_s": 0.5,
        "key_cache_ttl_s": 0.5, "policy_reload_interval_s": 0.5,
        "policies_file": write_policies(root),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def engineless_gateway(tmp_path_factory: pytest.TempPathFactory, name: str,
                       **overrides: object) -> Iterator[GatewayServer]:
    """A real gateway whose engines do not run: for a module-scoped fixture to ``yield from``."""
    root = tmp_path_factory.mktemp(name)
    with running_gateway(gateway_settings(root, copy_manifests(root / "models"),
                                          **overrides)) as server:
        yield server


@pytest.fixture(scope="session")
def gateway(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    settings = gateway_settings(tmp_path_factory.mktemp("gateway"), engines.models_dir)
    gw = GatewayServer(settings).start()
    try:
        yield gw
    finally:
        gw.stop()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `enclave` CLI against a gateway's state."""
    return subprocess.run([sys.executable, "-m", "serving.cli.main", *args],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives the CLI or a gateway process these settings' state."""
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(settings.data_dir),
           "ENCLAVE_MODELS_DIR": str(settings.models_dir), "ENCLAVE_PEPPER": TEST_PEPPER,
           "ENCLAVE_POLICIES_FILE": str(settings.policies_file)}
    for name in ("database_url", "redis_url"):
        value = getattr(settings, name)
        if value:
            env[f"ENCLAVE_{name.upper()}"] = str(value)
    for name in ("key_cache_ttl_s", "reservation_ttl_s", "ledger_sweep_interval_s",
                 "engine_health_interval_s", "policy_reload_interval_s"):
        env[f"ENCLAVE_{name.upper()}"] = str(getattr(settings, name))
    return env


def new_key(settings: Settings, client: str, policy: str = "default", *args: str) -> str:
    """A key for ``client`` (created with ``policy`` if it does not exist), via the real CLI."""
    made = cli(settings, "clients", "create", client, "--policy", policy)
    assert made.returncode == 0 or "exists already" in made.stderr, made.stderr
    out = cli(settings, "keys", "create", "--client", client, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="session")
def api_key(gateway: GatewayServer) -> str:
    return new_key(gateway.settings, "tests")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
