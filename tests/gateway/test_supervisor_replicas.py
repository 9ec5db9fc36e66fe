"""The supervisor's replicas and its sockets, without starting an engine: each replica's
command line and environment, and what each socket answers."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import yaml

from serving.engines import control
from serving.engines.environment import EngineEnvironment
from serving.engines.supervisor import Supervisor
from serving.storage.manifests import load_manifests
from tests.support import REPO

pytestmark = pytest.mark.anyio



def supervisor(tmp_path: Path) -> Supervisor:
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    data["versions"][0]["engine"].update(replicas=2, devices=["0", "1", "2", "3"],
                                         devices_per_replica=2)
    models = tmp_path / "models"
    models.mkdir()
    (models / "demo-chat.yaml").write_text(yaml.safe_dump(data))
    deps = [d for m in load_manifests(models) for d in m.deployments()]
    env = EngineEnvironment(root=tmp_path, gpu=True)
    return Supervisor(deps, env, lambda d: tmp_path / "weights", tmp_path / "run")


def test_each_replica_has_its_port_gpus_and_a_shutdown_timeout(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    r0, r1 = sup.engines
    assert (r0.name, r1.name) == ("demo-chat-v1/r0", "demo-chat-v1/r1")
    assert r1.port == r0.port + 1
    assert r0.environment(gpu=True)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert r1.environment(gpu=True)["CUDA_VISIBLE_DEVICES"] == "2,3"
    command = r1.command(Path("/usr/bin/python3"))
    assert command[command.index("--port") + 1] == str(r1.port)
    assert command[command.index("--shutdown-timeout") + 1] == "60"
    assert r0.log_path.name == "demo-chat-v1-r0.log"


async def test_the_events_socket_serves_events_and_never_a_drain(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    run = tmp_path / "run"
    full = control.ControlServer(sup, control.socket_path(run))
    events = control.ControlServer(sup, control.events_path(run), control.READ_ONLY, 0o660)
    await full.start()
    await events.start()
    try:
        assert stat.S_IMODE(control.socket_path(run).stat().st_mode) == 0o600
        assert stat.S_IMODE(control.events_path(run).stat().st_mode) == 0o660
        refused = await control.request(control.events_path(run),
                                        {"op": "drain", "replica": "demo-chat-v1/r0"})
        assert "not served" in refused["error"]
        status = await control.request(control.events_path(run), {"op": "status"})
        assert [r["replica"] for r in status["replicas"]] == ["demo-chat-v1/r0",
                                                              "demo-chat-v1/r1"]
        unknown = await control.request(control.socket_path(run),
                                        {"op": "drain", "replica": "nope/r9", "deadline_s": 1})
        assert "no replica" in unknown["error"]
        # A watcher gets the snapshot, then each change as it happens.
        stream = control.watch(control.events_path(run))
        snapshot = await anext(stream)
        assert snapshot["event"] == "snapshot"
        sup._set(sup.engines[1], "draining")
        event = await asyncio.wait_for(anext(stream), 5)
        assert (event["replica"], event["state"]) == ("demo-chat-v1/r1", "draining")
        await stream.aclose()
    finally:
        await events.close()
        await full.close()
