"""Picking an engine for a model (``upstream.pool``): only healthy, undrained versions with
traffic, in the manifest's split; a failed connection takes an engine out at once, a slow health
check only after strikes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from serving.storage.manifests import load_manifests
from serving.upstream.pool import HEALTH_STRIKES, EnginePool
from tests.support import REPO

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def two_versions(tmp_path: Path, split: dict[str, int]) -> EnginePool:
    """demo-chat with a second version (another port), traffic split as given."""
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v2 = {**data["versions"][0], "name": "v2",
          "engine": {**data["versions"][0]["engine"], "port": 8199}}
    data["versions"].append(v2)
    data["traffic"] = split
    (tmp_path / "demo-chat.yaml").write_text(yaml.safe_dump(data))
    return EnginePool(load_manifests(tmp_path))


def test_only_healthy_undrained_versions_with_traffic_are_picked(tmp_path: Path) -> None:
    pool = two_versions(tmp_path, {"v1": 100, "v2": 0})
    route = pool.routes["demo-chat"]
    v1, v2 = route.engines
    assert route.pick() is None  # nothing is healthy before the first check
    v1.healthy = v2.healthy = True
    assert {route.pick().name for _ in range(50)} == {"demo-chat-v1"}  # type: ignore[union-attr]
    pool.set_draining(v1, True)
    assert route.pick() is None  # v2 has no traffic: a drained v1 leaves nothing
    pool.set_draining(v1, False)
    assert route.pick(exclude={"demo-chat-v1"}) is None


def test_the_traffic_split_is_followed(tmp_path: Path) -> None:
    pool = two_versions(tmp_path, {"v1": 80, "v2": 20})
    route = pool.routes["demo-chat"]
    for engine in route.engines:
        engine.healthy = True
    picks = Counter(route.pick().name for _ in range(4000))  # type: ignore[union-attr]
    share = picks["demo-chat-v2"] / 4000
    assert 0.16 < share < 0.24, picks  # 20 %, well outside chance at this many draws
    assert {route.pick(exclude={"demo-chat-v1"}).name  # type: ignore[union-attr]
            for _ in range(20)} == {"demo-chat-v2"}
    route.engines[1].healthy = False
    assert {route.pick().name for _ in range(100)} == {"demo-chat-v1"}  # type: ignore[union-attr]


async def test_a_refused_connection_is_down_at_once_a_slow_answer_after_strikes(
        tmp_path: Path) -> None:
    pool = two_versions(tmp_path, {"v1": 50, "v2": 50})
    v1, v2 = pool.routes["demo-chat"].engines
    behaviour: dict[int, str] = {8199: "ok"}

    def answer(request: httpx.Request) -> httpx.Response:
        what = behaviour.get(request.url.port or 0, "ok")
        if what == "refused":
            raise httpx.ConnectError("refused", request=request)
        if what == "slow":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await pool.check_all(client)
        assert v1.healthy and v2.healthy
        behaviour[v2.deployment.port] = "slow"
        for _ in range(HEALTH_STRIKES - 1):
            await pool.check(client, v2)
        assert v2.healthy  # a busy engine answering late is not taken out for one miss
        await pool.check(client, v2)
        assert not v2.healthy and v2.last_error == "ReadTimeout"
        behaviour[v1.deployment.port] = "refused"
        await pool.check(client, v1)
        assert not v1.healthy  # gone: at once
        behaviour[v1.deployment.port] = "ok"
        await pool.check(client, v1)
        assert v1.healthy and v1.last_error is None
