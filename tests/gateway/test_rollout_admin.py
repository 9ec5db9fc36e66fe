"""Rollouts without engines: their rows on real SQLite and real PostgreSQL (one rollout under
way per model, an event per state change, commands waiting for the controller, the
controller's lease, each gateway's analysis windows), starting one (``RolloutService``: what
is refused before anything is written), the admin API and the CLI, and a gateway's controller
failing a version whose weights are not the pinned ones before any engine starts."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving.domain.rollout import RolloutPolicy
from serving.rollouts.service import Overrides, RolloutRefused, RolloutService
from serving.storage import migrate
from serving.storage.db import create_engine
from serving.storage.rollouts import RolloutExists, RolloutRecord, RolloutRepository, WindowRow
from tests.support import (
    REPO,
    GatewayServer,
    assert_openai_error,
    bearer,
    cli,
    copy_manifests,
    engineless_gateway,
    free_port,
    gateway_settings,
    new_key,
    wait_until,
)

pytestmark = pytest.mark.anyio
MODEL = "demo-chat"


def stage_v2(models_dir: Path, source: Path | None = None,
             sums: dict[str, str] | None = None) -> None:
    """demo-chat gets a staged version v2 (v1's engine on another port, traffic 0): what
    `enclave models import` leaves. ``source``/``sums``: its weights elsewhere, pinned so."""
    path = models_dir / f"{MODEL}.yaml"
    data = yaml.safe_load(path.read_text())
    v2 = copy.deepcopy(data["versions"][0])
    v2.update(name="v2", state="staged")
    v2["engine"]["port"] = free_port()
    if source is not None:
        v2["source"] = {"kind": "path", "path": str(source)}
        v2["sha256"] = sums or {}
    data["versions"].append(v2)
    data["traffic"]["v2"] = 0
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# -- the repository, on both backends ---------------------------------------------------------


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[RolloutRepository]:
    engine = create_engine(db_url)
    await migrate.upgrade(engine)
    yield RolloutRepository(engine)
    await engine.dispose()


def new_record(model: str = MODEL, version: str = "v2", at: float = 1000.0) -> RolloutRecord:
    return RolloutRecord(
        id=os.urandom(8).hex(), model=model, version=version, state="pending", paused=False,
        step=-1, step_started=None, plan=RolloutPolicy().model_dump(mode="json"), weights=None,
        stable={"v1": 100}, command=None, command_by=None, reason="started by cli:test",
        detail={}, created_by="cli:test", created_at=at, updated_at=at)


async def test_a_model_has_one_rollout_under_way_at_most(repo: RolloutRepository) -> None:
    first = new_record()
    await repo.create(first)
    with pytest.raises(RolloutExists):
        await repo.create(new_record(version="v3", at=1001))
    embed = new_record(model="minilm-embed", at=1002)
    await repo.create(embed)
    assert await repo.get(first.id) == first
    assert [r.id for r in await repo.active()] == [first.id, embed.id]
    assert [e.to_state for e in await repo.events(first.id)] == ["pending"]


async def test_each_state_change_is_an_event_and_a_final_state_frees_the_model(
        repo: RolloutRepository) -> None:
    r = new_record()
    await repo.create(r)
    r = await repo.transition(r, "controller", state="verifying", reason="verifying", now=1001)
    r = await repo.transition(r, "controller", now=1002, detail={"since": 1002})  # no event
    r = await repo.transition(r, "controller", state="canary", reason="step 1", now=1003,
                              step=0, step_started=1003.0, weights={"v1": 95, "v2": 5})
    assert (r.state, r.step, r.step_weight, r.weights, r.detail) == (
        "canary", 0, 5, {"v1": 95, "v2": 5}, {"since": 1002})
    assert [x.id for x in await repo.active()] == [r.id]
    r = await repo.transition(r, "controller", state="failed", reason="aborted", now=1004)
    assert r.state == "failed" and not r.active
    events = await repo.events(r.id)
    assert [(e.from_state, e.to_state, e.actor) for e in events] == [
        (None, "pending", "cli:test"), ("pending", "verifying", "controller"),
        ("verifying", "canary", "controller"), ("canary", "failed", "controller")]
    assert (events[2].step, events[2].weights, events[2].reason) == (0, {"v1": 95, "v2": 5},
                                                                      "step 1")
    assert await repo.active() == []
    # The model is free again: a new rollout, now the latest.
    again = new_record(at=2000)
    await repo.create(again)
    latest = await repo.latest(MODEL)
    assert latest is not None and latest.id == again.id
    assert [x.id for x in await repo.recent()] == [again.id, r.id]


async def test_a_command_waits_on_the_rollout_until_the_controller_applies_it(
        repo: RolloutRepository) -> None:
    assert await repo.command(MODEL, "pause", "admin:ops") is None  # no rollout under way
    r = new_record()
    await repo.create(r)
    read = await repo.command(MODEL, "pause", "admin:ops")
    assert read is not None and (read.command, read.command_by) == ("pause", "admin:ops")
    # While the controller applies the pause, an operator asks for an abort: it stays.
    await repo.command(MODEL, "abort", "admin:other")
    paused = await repo.transition(read, "admin:ops", now=1001, paused=True,
                                   reason="paused by admin:ops", done_command="pause")
    assert paused.paused and (paused.command, paused.command_by) == ("abort", "admin:other")
    done = await repo.transition(paused, "admin:other", state="failed", reason="aborted",
                                 now=1002, done_command="abort")
    assert (done.command, done.command_by) == (None, None)
    assert await repo.command(MODEL, "resume", "admin:ops") is None  # it has ended


async def test_the_controllers_lease_has_one_holder(repo: RolloutRepository) -> None:
    assert await repo.acquire("rollouts", "A", 10, now=100)
    assert not await repo.acquire("rollouts", "B", 10, now=105)
    assert await repo.acquire("rollouts", "A", 10, now=105)  # renewed: until 115
    assert not await repo.acquire("rollouts", "B", 10, now=112)
    assert await repo.acquire("rollouts", "B", 10, now=116)  # A's ran out: B takes it over
    assert not await repo.acquire("rollouts", "A", 10, now=117)
    await repo.release("rollouts", "A")  # not A's: nothing happens
    assert not await repo.acquire("rollouts", "A", 10, now=118)
    await repo.release("rollouts", "B")
    assert await repo.acquire("rollouts", "A", 10, now=119)  # at once, not at B's expiry
    assert await repo.acquire("other", "B", 10, now=119)  # another lease, another holder


async def test_each_gateways_window_row_is_replaced_not_added_to(
        repo: RolloutRepository) -> None:
    r = new_record()
    await repo.create(r)
    await repo.put_windows(r.id, "gw-a", [WindowRow(0, 0, "v2", "", {"requests": 5}),
                                          WindowRow(0, 0, "v1", "", {"requests": 50})], now=1)
    await repo.put_windows(r.id, "gw-a", [WindowRow(0, 0, "v2", "", {"requests": 7})], now=2)
    await repo.put_windows(r.id, "gw-b", [WindowRow(0, 0, "v2", "", {"requests": 3}),
                                          WindowRow(0, 1, "v2", "", {"requests": 1})], now=2)
    await repo.put_windows(r.id, "gw-a", [WindowRow(1, 0, "v2", "", {"requests": 9})], now=3)
    await repo.put_windows(r.id, "gw-a", [], now=4)
    rows = sorted((w.gateway, w.window, w.version, w.stats["requests"])
                  for w in await repo.windows(r.id, 0))
    assert rows == [("gw-a", 0, "v1", 50), ("gw-a", 0, "v2", 7), ("gw-b", 0, "v2", 3),
                    ("gw-b", 1, "v2", 1)]
    assert [w.stats for w in await repo.windows(r.id, 1)] == [{"requests": 9}]
    await repo.drop_windows(r.id)
    assert await repo.windows(r.id, 0) == [] and await repo.windows(r.id, 1) == []


# -- starting one: the service ----------------------------------------------------------------


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[RolloutService]:
    models = copy_manifests(tmp_path / "models")
    stage_v2(models)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await migrate.upgrade(engine)
    yield RolloutService(RolloutRepository(engine), models, REPO / "evals")
    await engine.dispose()


async def refused(service: RolloutService, model: str, version: str,
                  overrides: Overrides | None = None) -> RolloutRefused:
    with pytest.raises(RolloutRefused) as info:
        await service.start(model, version, "cli:test", overrides or Overrides())
    return info.value


async def test_a_rollout_that_cannot_run_is_refused_before_anything_is_written(
        service: RolloutService) -> None:
    unknown = await refused(service, "nope", "v2")
    assert unknown.param == "model" and "no model 'nope'" in str(unknown)
    missing = await refused(service, MODEL, "v9")
    assert missing.param == "version"
    assert "import it first (enclave models import demo-chat --from DIR --version v9)" in str(
        missing)
    serving = await refused(service, MODEL, "v1")
    assert serving.param == "version" and "takes 100% of demo-chat's traffic already" in str(
        serving)
    for steps, words in (([5, 50], "must end at 100"), ([50, 25, 100], "rising"),
                         ([0, 100], "rising"), ([], "must end at 100")):
        bad = await refused(service, MODEL, "v2", Overrides(steps=steps))
        assert bad.param == "steps" and words in str(bad), steps
    no_set = await refused(service, MODEL, "v2", Overrides(eval_set="no-such-set"))
    assert no_set.param == "eval"
    assert (await refused(service, MODEL, "v2", Overrides(window_s=7200))).param == "window"
    assert (await refused(service, MODEL, "v2", Overrides(step_duration_s=0))
            ).param == "step_duration"
    assert all(e.kind == "invalid" for e in (unknown, missing, serving, no_set))
    assert await service.repo.recent() == []


async def test_a_rollout_starts_pending_with_its_plan(service: RolloutService) -> None:
    record = await service.start(MODEL, "v2", "cli:test", Overrides(
        steps=[10, 100], step_duration_s=120, window_s=30, eval_set="demo-chat"))
    assert (record.state, record.step, record.weights, record.stable, record.active) == (
        "pending", -1, None, {"v1": 100}, True)
    assert record.steps == [10, 100]
    assert record.plan["step_duration_s"] == 120
    assert record.plan["analysis"]["window_s"] == 30
    assert record.plan["analysis"]["min_requests"] == 20  # the rest: the manifest's (defaults)
    assert record.plan["eval"]["set"] == "demo-chat"
    assert await service.repo.get(record.id) == record
    conflict = await refused(service, MODEL, "v2")
    assert (conflict.kind, conflict.param) == ("conflict", "model")
    assert "(v2, pending)" in str(conflict)
    found = await service.status(MODEL)
    assert found is not None and found[0].id == record.id
    assert [e.to_state for e in found[1]] == ["pending"]
    assert await service.status("minilm-embed") is None
    with pytest.raises(RolloutRefused) as bad:
        await service.command(MODEL, "restart", "cli:test")
    assert bad.value.param == "command"
    with pytest.raises(RolloutRefused) as none:
        await service.command("minilm-embed", "abort", "cli:test")
    assert none.value.kind == "missing"
    waiting = await service.command(MODEL, "abort", "cli:test")
    assert (waiting.id, waiting.command, waiting.state) == (record.id, "abort", "pending")


async def test_the_manifests_policy_is_the_plan_and_no_eval_drops_its_gate(
        service: RolloutService) -> None:
    path = service.models_dir / f"{MODEL}.yaml"
    data = yaml.safe_load(path.read_text())
    data["rollout"] = {"steps": [20, 100], "step_duration_s": 60,
                       "eval": {"set": "demo-chat", "min_pass_rate": 0.8}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    record = await service.start(MODEL, "v2", "cli:test", Overrides(no_eval=True))
    assert record.steps == [20, 100] and record.plan["step_duration_s"] == 60
    assert record.plan["eval"]["set"] is None and record.plan["eval"]["min_pass_rate"] == 0.8


# -- the admin API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """No controller: a rollout stays as the API left it."""
    for server in engineless_gateway(tmp_path_factory, "gw-rollouts", rollout_controller=False):
        stage_v2(server.settings.models_dir)
        yield server


@pytest.fixture(scope="module")
def admin(gw: GatewayServer) -> dict[str, str]:
    return bearer(new_key(gw.settings, "operators", "admin"))


START = {"model": MODEL, "version": "v2", "steps": [10, 100], "step_duration": "2m",
         "window": "30s", "no_eval": True}


def api(gw: GatewayServer, method: str, path: str, headers: dict[str, str] | None = None,
        **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + "/admin/v1/rollouts" + path, headers=headers,
                         timeout=10, **kw)


def test_rollouts_are_for_admins_only(gw: GatewayServer) -> None:
    user = bearer(new_key(gw.settings, "app", "default"))
    assert_openai_error(api(gw, "POST", "", json=START), 401)
    denied = assert_openai_error(api(gw, "POST", "", user, json=START), 403)
    assert denied["code"] == "permission_denied"
    assert_openai_error(api(gw, "GET", "/demo-chat", user), 403)
    assert_openai_error(api(gw, "POST", "/demo-chat/abort", user), 403)


def test_a_start_the_gateway_cannot_carry_out_is_refused(gw: GatewayServer,
                                                          admin: dict[str, str]) -> None:
    typo = assert_openai_error(api(gw, "POST", "", admin, json={**START, "canary": 5}), 400)
    assert typo["param"] == "canary"
    steps = assert_openai_error(api(gw, "POST", "", admin, json={**START, "steps": [5, 50]}),
                                400)
    assert steps["param"] == "steps" and "must end at 100" in steps["message"]
    model = assert_openai_error(api(gw, "POST", "", admin, json={**START, "model": "nope"}),
                                400)
    assert model["param"] == "model"
    version = assert_openai_error(api(gw, "POST", "", admin, json={**START, "version": "v9"}),
                                  400)
    assert version["param"] == "version" and "import it" in version["message"]
    window = assert_openai_error(api(gw, "POST", "", admin, json={**START, "window": "soon"}),
                                 400)
    assert window["param"] == "window"
    assert_openai_error(api(gw, "GET", "/minilm-embed", admin), 404)  # never had one
    gone = assert_openai_error(api(gw, "POST", "/minilm-embed/abort", admin), 404)
    assert gone["param"] == "model"


def test_a_rollout_is_started_followed_and_commanded(gw: GatewayServer,
                                                      admin: dict[str, str]) -> None:
    made = api(gw, "POST", "", admin, json=START)
    assert made.status_code == 201, made.text
    record = made.json()
    assert (record["state"], record["version"], record["steps"]) == ("pending", "v2", [10, 100])
    assert record["plan"]["step_duration_s"] == 120
    assert record["plan"]["analysis"]["window_s"] == 30
    assert record["plan"]["eval"]["set"] is None
    assert record["created_by"] == "admin:operators"
    conflict = assert_openai_error(api(gw, "POST", "", admin, json=START), 409)
    assert (conflict["code"], conflict["param"]) == ("conflict", "model")

    shown = api(gw, "GET", "/demo-chat", admin)
    assert shown.status_code == 200, shown.text
    assert shown.json()["id"] == record["id"]
    assert [(e["from"], e["to"], e["actor"]) for e in shown.json()["events"]] == [
        (None, "pending", "admin:operators")]

    paused = api(gw, "POST", "/demo-chat/pause", admin)
    assert paused.status_code == 202, paused.text
    assert (paused.json()["id"], paused.json()["command"]) == (record["id"], "pause")
    assert api(gw, "GET", "/demo-chat", admin).json()["command"] == "pause"
    bogus = assert_openai_error(api(gw, "POST", "/demo-chat/bogus", admin), 400)
    assert bogus["param"] == "command"

    listed = api(gw, "GET", "", admin)
    assert listed.status_code == 200
    assert [r["id"] for r in listed.json()["data"]] == [record["id"]]


# -- the controller, on a gateway of its own --------------------------------------------------


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """v2's config.json is not the file its manifest pins."""
    weights = tmp_path_factory.mktemp("weights-v2")
    (weights / "config.json").write_text('{"layers": 3}')
    sums = {"config.json": hashlib.sha256(b'{"layers": 2}').hexdigest()}
    for server in engineless_gateway(tmp_path_factory, "gw-rollout-controller"):
        stage_v2(server.settings.models_dir, weights, sums)
        yield server


def test_weights_that_do_not_verify_fail_the_rollout_before_any_engine_starts(
        tampered: GatewayServer) -> None:
    admin = bearer(new_key(tampered.settings, "operators", "admin"))
    made = api(tampered, "POST", "", admin, json=START)
    assert made.status_code == 201, made.text

    def state() -> dict[str, Any]:
        data: dict[str, Any] = api(tampered, "GET", "/demo-chat", admin).json()
        return data

    wait_until(lambda: state()["state"] == "failed", 10, what="the rollout failed")
    failed = state()
    assert failed["reason"].startswith("weights check failed: ")
    assert "config.json: sha256" in failed["reason"] and "does not match" in failed["reason"]
    assert [e["to"] for e in failed["events"]] == ["pending", "verifying", "failed"]
    assert failed["active"] is False
    manifest = yaml.safe_load((tampered.settings.models_dir / f"{MODEL}.yaml").read_text())
    assert manifest["versions"][1]["state"] == "staged"  # never set serving: no engine
    assert manifest["traffic"] == {"v1": 100, "v2": 0}


# -- the CLI ----------------------------------------------------------------------------------


def test_the_cli_starts_shows_and_aborts_a_rollout(tmp_path: Path) -> None:
    models = copy_manifests(tmp_path / "models")
    stage_v2(models)
    settings = gateway_settings(tmp_path, models)
    nothing = cli(settings, "rollout", "abort", MODEL)
    assert nothing.returncode == 1 and "has no rollout under way" in nothing.stderr
    unknown = cli(settings, "rollout", "start", MODEL, "v9")
    assert unknown.returncode == 1
    assert "has no version 'v9'" in unknown.stderr
    assert "enclave models import demo-chat --from DIR --version v9" in unknown.stderr
    bad = cli(settings, "rollout", "start", MODEL, "v2", "--steps", "5,50")
    assert bad.returncode == 1 and "must end at 100" in bad.stderr

    started = cli(settings, "rollout", "start", MODEL, "v2", "--steps", "10,100", "--no-eval")
    assert started.returncode == 0, started.stderr
    status = cli(settings, "rollout", "status", MODEL, "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["state"], shown["version"], shown["steps"]) == ("pending", "v2", [10, 100])
    assert [e["to"] for e in shown["events"]] == ["pending"]

    aborted = cli(settings, "rollout", "abort", MODEL)
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(cli(settings, "rollout", "status", MODEL, "--json").stdout)[
        "command"] == "abort"
    never = cli(settings, "rollout", "status", "minilm-embed")
    assert never.returncode == 1 and "has had no rollout" in never.stderr
