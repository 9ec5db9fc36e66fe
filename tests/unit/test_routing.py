"""Picking a replica (``upstream.pool``, ``balancer``, ``affinity``, ``replicas``): versions by
traffic split, replicas by least outstanding requests (two random choices), prefix affinity
bounded by load, passive ejection with backoff and one half-open probe, the retry budget, and
the three sources of a replica's state (health checks, the supervisor's events, DNS)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving.domain.manifest import Manifest
from serving.storage.manifests import load_manifests
from serving.upstream.affinity import Prefix
from serving.upstream.balancer import RetryBudget
from serving.upstream.pool import HEALTH_STRIKES, EnginePool, ModelRoute, parse_load
from serving.upstream.replicas import EjectionPolicy, Replica
from tests.support import REPO

pytestmark = pytest.mark.anyio



def manifest(tmp_path: Path, split: dict[str, int], replicas: int = 1,
             **engine: object) -> Path:
    """demo-chat with a second version (another port), traffic split as given."""
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    data["versions"][0]["engine"].update(replicas=replicas, **engine)
    v2 = {**data["versions"][0], "name": "v2",
          "engine": {**data["versions"][0]["engine"], "port": 8199, "endpoints": [],
                     "replicas": 1, "devices": []}}
    data["versions"].append(v2)
    data["traffic"] = split
    (tmp_path / "demo-chat.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def pool_of(tmp_path: Path, split: dict[str, int], replicas: int = 1, **kw: object) -> EnginePool:
    return EnginePool(load_manifests(manifest(tmp_path, split, replicas)), **kw)  # type: ignore[arg-type]


def up(route: ModelRoute) -> list[Replica]:
    for r in route.replicas:
        r.healthy = True
    return route.replicas


def pick(route: ModelRoute, tried: tuple[Replica, ...] = (), keys: bytes | None = None
         ) -> Replica | None:
    replica, _ = route.pick(tried, None, Prefix(keys) if keys is not None else None)
    if replica is not None:
        replica.in_flight -= 1  # released at once: these tests look at the choice only
        replica.probing = False
    return replica


def test_only_available_versions_with_traffic_are_picked(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0})
    route = pool.routes["demo-chat"]
    assert [r.name for r in route.replicas] == ["demo-chat-v1/r0", "demo-chat-v2/r0"]
    v1, v2 = route.replicas
    assert pick(route) is None  # nothing is healthy before the first check
    up(route)
    assert {pick(route).name for _ in range(50)} == {"demo-chat-v1/r0"}  # type: ignore[union-attr]
    pool.set_draining(v1, True)
    assert pick(route) is None  # v2 has no traffic: a drained v1 leaves nothing
    pool.set_draining(v1, False)
    assert pick(route, tried=(v1,)) is None
    # A pinned version is used even at weight 0.
    replica, _ = route.pick((), route.version("v2"), None)
    assert replica is v2 and v2.in_flight == 1


def test_the_traffic_split_is_followed(tmp_path: Path) -> None:
    route = pool_of(tmp_path, {"v1": 80, "v2": 20}).routes["demo-chat"]
    v1, v2 = up(route)
    picks = Counter(pick(route).name for _ in range(4000))  # type: ignore[union-attr]
    share = picks["demo-chat-v2/r0"] / 4000
    assert 0.16 < share < 0.24, picks  # 20 %, well outside chance at this many draws
    assert {pick(route, tried=(v1,)).name for _ in range(20)} == {"demo-chat-v2/r0"}  # type: ignore[union-attr]
    v2.healthy = False
    assert {pick(route).name for _ in range(100)} == {"demo-chat-v1/r0"}  # type: ignore[union-attr]


def test_replicas_get_their_own_ports_and_devices(tmp_path: Path) -> None:
    manifests = load_manifests(manifest(tmp_path, {"v1": 100, "v2": 0}, replicas=3,
                                        devices=["0", "1", "2", "3", "4", "5"],
                                        devices_per_replica=2))
    engine = manifests[0].versions[0].engine
    assert engine.local_replicas() == [(0, engine.port, "0,1"), (1, engine.port + 1, "2,3"),
                                       (2, engine.port + 2, "4,5")]
    pool = EnginePool(manifests)
    assert [r.base_url for r in pool.routes["demo-chat"].versions[0].replicas] == [
        f"http://127.0.0.1:{engine.port + i}" for i in range(3)]


def test_two_choices_prefer_the_less_loaded_and_count_at_the_decision(tmp_path: Path) -> None:
    route = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=2).routes["demo-chat"]
    a, b = up(route)[:2]
    a.in_flight = 5
    assert {pick(route).name for _ in range(50)} == {b.name}
    a.in_flight = 0
    # A burst of decisions with nothing released: each counts at once, so it spreads evenly
    # (llm-d #2515 herded bursts because counts were updated after the decision).
    for _ in range(100):
        route.pick((), None, None)
    assert (a.in_flight, b.in_flight) == (50, 50)


def test_engine_reported_queue_counts_while_fresh(tmp_path: Path) -> None:
    route = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=2).routes["demo-chat"]
    a, b = up(route)[:2]
    a.waiting, a.load_at = 10, time.monotonic()  # another gateway's requests queue on a
    assert {pick(route).name for _ in range(30)} == {b.name}
    a.load_at = time.monotonic() - 3  # stale: ignored
    assert {pick(route).name for _ in range(100)} == {a.name, b.name}
    assert parse_load(b"# HELP x\nvllm:num_requests_waiting{engine=\"0\"} 3.0\n"
                      b"vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 7.0\n"
                      b'vllm:kv_cache_usage_perc{engine="0"} 0.5\n') == (3.0, 0.5)


def test_prefix_affinity_follows_the_prefix_within_the_load_bound(tmp_path: Path) -> None:
    route = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=3).routes["demo-chat"]
    up(route)
    system = "You are a careful assistant. " * 40
    first = (b'{"messages":[{"role":"system","content":"%s"},{"role":"user",'
             b'"content":"hello"}]}' % system.encode())
    chosen = pick(route, keys=first)
    assert chosen is not None
    # Another conversation with the same system prompt, and a longer turn of the first one.
    other = (b'{"messages":[{"role":"system","content":"%s"},{"role":"user",'
             b'"content":"something else"}]}' % system.encode())
    assert {pick(route, keys=other) for _ in range(20)} == {chosen}
    # Over the bound (1.25 x the mean + 1), the next replica on the ring takes it.
    chosen.in_flight = 10
    spill = pick(route, keys=other)
    assert spill is not None and spill is not chosen
    chosen.in_flight = 0
    # Different system prompts spread over the replicas (the ring).
    names = {pick(route, keys=b'{"messages":"prompt %d"}' % i).name  # type: ignore[union-attr]
             for i in range(60)}
    assert len(names) == 3


def test_ejection_backs_off_and_one_probe_brings_the_replica_back(tmp_path: Path) -> None:
    policy = EjectionPolicy(failures=3, base_s=0.05, max_s=0.2)
    route = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=2).routes["demo-chat"]
    a, b = up(route)[:2]
    assert not a.failed(False, policy) and not a.failed(False, policy)
    assert a.failed(False, policy)  # the third in a row
    assert {pick(route).name for _ in range(20)} == {b.name}
    time.sleep(0.06)
    assert {pick(route).name for _ in range(20)} == {b.name}  # no health answer since
    a.last_alive = time.monotonic()
    probe, _ = route.pick((b,), None, None)
    assert probe is a and a.probing
    assert pick(route, tried=(b,)) is None  # one probe at a time
    assert not a.failed(True, policy)  # a request from before the ejection: no change
    assert a.failed(False, policy, probe=True)  # the probe failed: ejected again, for longer
    assert a.ejected_until - a.ejected_at == pytest.approx(0.1)
    a.in_flight = 0
    time.sleep(0.11)
    a.last_alive = time.monotonic()
    probe, _ = route.pick((b,), None, None)
    assert probe is a
    a.succeeded()
    assert a.state(time.monotonic()) == "ready" and a.ejections == 0
    assert a.failed(True, policy)  # a refused connection ejects at once


def test_the_retry_budget_never_exceeds_its_share_of_requests() -> None:
    budget = RetryBudget(0.2, cap=10, reserve=3)
    granted = 0
    for _ in range(1000):
        budget.deposit()
        granted += budget.withdraw() + budget.withdraw()  # every request wants two retries
    assert 199 <= granted <= 203  # 20% of requests, and the starting reserve
    fresh = RetryBudget(reserve=3)
    assert [fresh.withdraw() for _ in range(4)] == [True, True, True, False]


async def test_health_refused_is_down_at_once_slow_after_strikes(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 50, "v2": 50})
    v1, v2 = pool.routes["demo-chat"].replicas
    behaviour: dict[int, str] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        what = behaviour.get(request.url.port or 0, "ok")
        if what == "refused":
            raise httpx.ConnectError("refused", request=request)
        if what == "slow":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await pool.check_all(client)
        assert v1.healthy and v2.healthy and v1.last_alive > 0
        behaviour[8199] = "slow"
        for _ in range(HEALTH_STRIKES - 1):
            await pool.check(client, v2)
        assert v2.healthy  # a busy engine answering late is not taken out for one miss
        await pool.check(client, v2)
        assert not v2.healthy and v2.last_error == "ReadTimeout"
        port = v1.deployment.port
        behaviour[port] = "refused"
        await pool.check(client, v1)
        assert not v1.healthy  # gone: at once
        behaviour[port] = "ok"
        await pool.check(client, v1)
        assert v1.healthy and v1.last_error is None


def test_supervisor_events_apply_at_once(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=2)
    route = pool.routes["demo-chat"]
    a, b = up(route)[:2]
    pool.apply({"replica": a.name, "state": "healthy"})
    a.eject(EjectionPolicy())
    pool.apply({"replica": a.name, "state": "healthy"})  # a reconnect's snapshot: no change
    assert not a.available(time.monotonic())
    pool.apply({"replica": a.name, "state": "exited"})
    assert not a.healthy
    pool.apply({"replica": a.name, "state": "healthy"})  # a fresh engine: ejection forgotten
    assert a.available(time.monotonic())
    pool.apply({"replica": b.name, "state": "draining"})
    assert {pick(route).name for _ in range(20)} == {a.name}
    pool.apply({"replica": "demo-chat-v1/r9", "state": "healthy"})  # unknown: ignored


async def test_a_name_resolves_to_one_replica_per_private_address(tmp_path: Path) -> None:
    pool = EnginePool(load_manifests(manifest(tmp_path, {"v1": 100, "v2": 0}, replicas=0,
                                              endpoints=[{"url": "http://localhost:9001"}])))
    group = pool.routes["demo-chat"].versions[0]
    assert group.replicas == []
    await pool.resolve_all()
    names = {r.name for r in group.replicas}
    assert "demo-chat-v1/127.0.0.1:9001" in names
    assert all(r.server_hostname == "localhost" for r in group.replicas)


def test_plain_http_off_loopback_is_refused(tmp_path: Path) -> None:
    path = manifest(tmp_path, {"v1": 100, "v2": 0}, replicas=0,
                    endpoints=[{"url": "http://10.0.0.7:8000"}])
    with pytest.raises(ValueError, match="plain HTTP"):
        EnginePool(load_manifests(path))
    assert EnginePool(load_manifests(path), allow_plaintext=True).routes
    path = manifest(tmp_path, {"v1": 100, "v2": 0}, replicas=0,
                    endpoints=[{"url": "https://8.8.8.8:8000"}])
    with pytest.raises(ValueError, match="not a private address"):
        EnginePool(load_manifests(path))


# -- live manifests (EnginePool.update) ---------------------------------------------------


def edit(models: Path, change: Callable[[dict[str, Any]], None], name: str = "demo-chat"
         ) -> list[Manifest]:
    """``models/<name>.yaml`` changed by ``change``; the whole set, loaded again."""
    path = models / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return load_manifests(models)


def test_an_update_changes_weights_in_place(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0})
    route = pool.routes["demo-chat"]
    v1, v2 = up(route)
    pool.update(edit(tmp_path, lambda d: d.update(traffic={"v1": 50, "v2": 50})))
    assert route.replicas == [v1, v2] and v1.healthy and v2.healthy  # the same replicas
    assert [g.deployment.weight for g in route.versions] == [50, 50]
    assert v2.deployment.weight == 50  # each replica's deployment follows its version's
    assert {pick(route).name for _ in range(100)} == {v1.name, v2.name}  # type: ignore[union-attr]


def test_a_new_version_joins_down_until_it_is_seen_healthy(tmp_path: Path) -> None:
    def retire_v2(d: dict[str, Any]) -> None:
        d["versions"][1]["state"] = "retired"

    edit(manifest(tmp_path, {"v1": 100, "v2": 0}), retire_v2)
    pool = EnginePool(load_manifests(tmp_path))
    route = pool.routes["demo-chat"]
    [v1] = up(route)

    def serve_v2(d: dict[str, Any]) -> None:
        d["versions"][1]["state"] = "serving"
        d["traffic"] = {"v1": 50, "v2": 50}

    pool.update(edit(tmp_path, serve_v2))
    group = route.version("v2")
    assert group is not None and [r.name for r in group.replicas] == ["demo-chat-v2/r0"]
    [v2] = group.replicas
    assert not v2.healthy and pool.replica(v2.name) is v2
    assert {pick(route).name for _ in range(50)} == {v1.name}  # type: ignore[union-attr]
    pool.apply({"replica": v2.name, "state": "starting"})  # the supervisor starts it
    pool.apply({"replica": v2.name, "state": "healthy"})
    assert {pick(route).name for _ in range(100)} == {v1.name, v2.name}  # type: ignore[union-attr]


def test_a_retired_version_takes_no_new_request_and_leaves_once_idle(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 50, "v2": 50})
    route = pool.routes["demo-chat"]
    v1, v2 = up(route)
    v2.in_flight = 1  # a request it is still answering

    def retire_v2(d: dict[str, Any]) -> None:
        d["versions"][1]["state"] = "retired"
        d["traffic"] = {"v1": 100}

    pool.update(edit(tmp_path, retire_v2))
    assert v2.removed and v2.deployment.version.state == "retired"
    assert {pick(route).name for _ in range(100)} == {v1.name}  # type: ignore[union-attr]
    assert route.pick((), route.version("v2"), None) == (None, None)  # pinned: nothing either
    pool._drop_removed()
    assert route.replicas == [v1, v2]  # its request still runs
    v2.in_flight = 0
    pool._drop_removed()
    assert route.replicas == [v1] and route.version("v2") is None


def test_replicas_follow_their_count_and_a_moved_port_is_a_new_replica(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0}, replicas=2)
    route = pool.routes["demo-chat"]
    r0, r1, _ = up(route)
    port = r0.port

    def one_replica(d: dict[str, Any]) -> None:
        d["versions"][0]["engine"]["replicas"] = 1

    pool.update(edit(tmp_path, one_replica))
    assert r1.removed and not r0.removed
    assert {pick(route).name for _ in range(50)} == {r0.name}  # type: ignore[union-attr]

    def moved(d: dict[str, Any]) -> None:
        d["versions"][0]["engine"]["port"] = port + 10

    pool.update(edit(tmp_path, moved))
    pool._drop_removed()
    group = route.versions[0]
    assert r0.removed and [r.base_url for r in group.replicas] == [
        f"http://127.0.0.1:{port + 10}"]
    assert pool.replica(r0.name) is group.replicas[0] and not group.replicas[0].healthy
    assert group.ring is None


def test_a_new_manifest_adds_a_model_and_a_deleted_one_removes_it(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0})
    data = yaml.safe_load((tmp_path / "demo-chat.yaml").read_text())
    data["name"] = "demo-two"
    for i, version in enumerate(data["versions"]):
        version["engine"]["port"] = 8300 + i
    (tmp_path / "demo-two.yaml").write_text(yaml.safe_dump(data))
    pool.update(load_manifests(tmp_path))
    two = pool.routes["demo-two"]
    assert [r.name for r in two.replicas] == ["demo-two-v1/r0", "demo-two-v2/r0"]
    assert not any(r.healthy for r in two.replicas)
    pool.routes["demo-chat"].replicas[0].in_flight = 1
    (tmp_path / "demo-chat.yaml").unlink()
    pool.update(load_manifests(tmp_path))
    assert set(pool.routes) == {"demo-two"} and pool.route("demo-chat") is None
    assert pool.replica("demo-chat-v1/r0") is None


def test_a_set_with_a_plain_http_endpoint_is_refused_whole(tmp_path: Path) -> None:
    pool = pool_of(tmp_path, {"v1": 100, "v2": 0})
    route = pool.routes["demo-chat"]
    before = [(g.deployment, list(g.replicas)) for g in route.versions]

    def plain(d: dict[str, Any]) -> None:
        d["traffic"] = {"v1": 50, "v2": 50}
        d["versions"][1]["engine"]["endpoints"] = [{"url": "http://10.0.0.7:8000"}]

    with pytest.raises(ValueError, match="plain HTTP"):
        pool.update(edit(tmp_path, plain))
    assert [(g.deployment, g.replicas) for g in route.versions] == before
    assert pool.routes == {"demo-chat": route}
