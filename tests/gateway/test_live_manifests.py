"""Live manifests, end to end without vLLM: the supervisor starts a new version's replica and
drains a retired one while the others run on untouched (same process), and a running gateway
picks up a new model's manifest, refusing a bad one with the running set kept.

The engines here are a stand-in (``STANDIN_ENGINE``, run as the engine environment's
``python``): a small HTTP server answering ``/health`` and ``/metrics`` on the port the
supervisor gives it. A real engine takes a minute to start; what is tested is the supervisor's
bookkeeping, not the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager

from serving.app import create_app
from serving.container import Services
from serving.domain.manifest import Deployment
from serving.engines.environment import EngineEnvironment
from serving.engines.supervisor import Supervisor
from serving.storage.manifests import load_manifests
from tests.support import REPO, copy_manifests, free_port, gateway_settings

pytestmark = pytest.mark.anyio

STANDIN_ENGINE = """\
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])


class Engine(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (b"vllm:num_requests_running 0.0\\nvllm:num_requests_waiting 0.0\\n"
                if self.path == "/metrics" else b"{}")
        self.send_response(200 if self.path in ("/health", "/metrics") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer((host, port), Engine).serve_forever()
"""


def models_dir(root: Path) -> Path:
    """demo-chat with v1 serving and v2 staged, each on a free port, no pinned weights."""
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v1 = data["versions"][0]
    v1["sha256"] = {}
    v1["engine"].update(port=free_port(), shutdown_timeout_s=2)
    v2 = {**v1, "name": "v2", "state": "staged",
          "engine": {**v1["engine"], "port": free_port()}}
    data["versions"].append(v2)
    models = root / "models"
    models.mkdir()
    (models / "demo-chat.yaml").write_text(yaml.safe_dump(data))
    return models


def edit(models: Path, change: Callable[[dict[str, Any]], None]) -> list[Deployment]:
    path = models / "demo-chat.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return [d for m in load_manifests(models) for d in m.deployments()]


async def until(what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout_s} s: {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Path, list[dict[str, object]]]]:
    env = EngineEnvironment(root=tmp_path / "env", gpu=False)
    env.python.parent.mkdir(parents=True)
    env.python.write_text(f"#!{sys.executable}\n{STANDIN_ENGINE}")
    env.python.chmod(0o755)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    models = models_dir(tmp_path)
    deps = [d for m in load_manifests(models) for d in m.deployments()]
    sup = Supervisor(deps, env, lambda d: weights, tmp_path / "run")
    events: list[dict[str, object]] = []
    sup.subscribe(events.append)
    await sup.start()
    try:
        assert await sup.wait_healthy(30), sup.snapshot()
        yield sup, models, events
    finally:
        await sup.stop()


def serving_v2(data: dict[str, Any]) -> None:
    data["versions"][1]["state"] = "serving"
    data["traffic"] = {"v1": 90, "v2": 10}


def retired_v2(data: dict[str, Any]) -> None:
    data["versions"][1]["state"] = "retired"
    data["traffic"] = {"v1": 100}


async def test_a_new_version_starts_without_restarting_the_running_one(
        rig: tuple[Supervisor, Path, list[dict[str, object]]]) -> None:
    sup, models, _ = rig
    [v1] = sup.engines
    pid = v1.pid
    await sup.update(edit(models, serving_v2))
    v2 = sup.replica("demo-chat-v2/r0")
    assert v2 is not None
    await until("v2 healthy", lambda: v2.state == "healthy")
    assert (v1.pid, v1.restarts, v1.state) == (pid, 0, "healthy")  # untouched
    assert v1.deployment.weight == 90  # a weight change is taken in place
    state = json.loads(sup.state_file.read_text())
    assert set(state) == {"demo-chat-v1/r0", "demo-chat-v2/r0"}


async def test_a_retired_version_is_drained_and_leaves(
        rig: tuple[Supervisor, Path, list[dict[str, object]]]) -> None:
    sup, models, events = rig
    await sup.update(edit(models, serving_v2))
    v2 = sup.replica("demo-chat-v2/r0")
    assert v2 is not None
    await until("v2 healthy", lambda: v2.state == "healthy")
    [v1, _] = sup.engines
    pid = v1.pid
    events.clear()
    await sup.update(edit(models, retired_v2))  # returns at once: the drain is a task
    assert v2 in sup.engines and v2.state == "draining"
    await until("v2 gone", lambda: v2 not in sup.engines)
    mine = [e["state"] for e in events if e["replica"] == "demo-chat-v2/r0"]
    assert mine[0] == "draining" and mine[-1] == "stopped", mine
    assert v2.proc is not None and v2.proc.returncode is not None
    assert set(json.loads(sup.state_file.read_text())) == {"demo-chat-v1/r0"}
    assert (v1.pid, v1.restarts, v1.state) == (pid, 0, "healthy")
    assert not [e for e in events if e["replica"] == "demo-chat-v1/r0"]  # never paused


async def test_bad_weights_keep_a_version_out_and_a_command_change_waits_for_a_restart(
        rig: tuple[Supervisor, Path, list[dict[str, object]]],
        caplog: pytest.LogCaptureFixture) -> None:
    sup, models, _ = rig
    [v1] = sup.engines
    pid, deployment = v1.pid, v1.deployment
    wrong = hashlib.sha256(b"other weights").hexdigest()

    def bad_v2_and_new_args(data: dict[str, Any]) -> None:
        serving_v2(data)
        data["versions"][1]["sha256"] = {"model.safetensors": wrong}
        data["versions"][0]["engine"]["args"] = [*data["versions"][0]["engine"]["args"],
                                                 "--seed", "7"]

    with caplog.at_level(logging.WARNING, logger="enclave.supervisor"):
        await sup.update(edit(models, bad_v2_and_new_args))
    assert sup.replica("demo-chat-v2/r0") is None
    [refused] = [r for r in caplog.records if r.getMessage().startswith("weights check")]
    assert "model.safetensors" in refused.error  # type: ignore[attr-defined]
    [waits] = [r for r in caplog.records if "restart to apply" in r.getMessage()]
    assert waits.changed == ["engine.args"]  # type: ignore[attr-defined]
    assert sup.engines == [v1] and v1.pid == pid and v1.deployment is deployment


async def test_a_running_gateway_follows_the_manifests(tmp_path: Path) -> None:
    models = copy_manifests(tmp_path / "models")
    settings = gateway_settings(tmp_path, models, manifest_reload_interval_s=0.05)
    app = create_app(settings, transport=httpx.MockTransport(lambda _: httpx.Response(503)))
    async with LifespanManager(app):
        services: Services = app.state.services
        pool = services.pool
        data = yaml.safe_load((models / "demo-chat.yaml").read_text())
        data["name"] = "demo-two"
        for version in data["versions"]:
            version["engine"]["port"] = free_port()
        (models / "demo-two.yaml").write_text(yaml.safe_dump(data))
        await until("demo-two routed", lambda: "demo-two" in pool.routes)
        assert "demo-two" in services.policies.known_models
        data["versions"][0]["engine"]["endpoints"] = [{"url": "http://10.0.0.7:8000"}]
        (models / "demo-two.yaml").write_text(yaml.safe_dump(data))
        await asyncio.sleep(0.3)
        assert [r.name for r in pool.routes["demo-two"].replicas] == ["demo-two-v1/r0"]
        (models / "demo-two.yaml").unlink()
        await until("demo-two gone", lambda: "demo-two" not in pool.routes)
        assert set(pool.routes) == {"demo-chat", "minilm-embed"}


async def test_stopping_while_a_retired_replica_drains_stops_everything(
        rig: tuple[Supervisor, Path, list[dict[str, object]]]) -> None:
    sup, models, _ = rig
    await sup.update(edit(models, serving_v2))
    await until("both healthy", lambda: all(e.state == "healthy" for e in sup.engines)
                and len(sup.engines) == 2)
    await sup.update(edit(models, retired_v2))
    await sup.stop()  # the drain is cancelled; its engine stops with the others
    assert all(e.proc is not None and e.proc.returncode is not None for e in sup.engines)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("retire-", "engine-"))
                and not t.done()]
