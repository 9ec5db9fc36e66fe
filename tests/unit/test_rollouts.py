"""A rollout's parts that need no engine and no database: judging a window (``analysis``), a
step's traffic split (``weights``), counting each version's requests in windows
(``recorder``), keeping a conversation on one version (``upstream.split``,
``ModelRoute.pick``), and a gateway's routes and metrics following the rollout (``follower``).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.contract import ChatRequest, CompletionRequest
from serving.domain.outcome import Outcome
from serving.domain.rollout import Analysis, RolloutPolicy
from serving.metrics import GatewayMetrics
from serving.rollouts import analysis
from serving.rollouts.follower import RolloutFollower
from serving.rollouts.recorder import RolloutRecorder
from serving.rollouts.weights import canary_weights
from serving.storage.db import create_engine
from serving.storage.manifests import load_manifests
from serving.storage.rollouts import RolloutRecord, RolloutRepository
from serving.upstream import split
from serving.upstream.pool import EnginePool, ModelRoute
from serving.upstream.replicas import Replica
from tests.support import REPO

MODEL = "demo-chat"
RULES = Analysis()  # min_requests 20, error margin 2 %, absolute 5 %, latency x1.5, slack 50 ms


# -- analysis ---------------------------------------------------------------------------------


def stats(requests: int, errors: int = 0, refusals: int = 0, ttft: list[float] | None = None,
          tpot: list[float] | None = None) -> dict[str, Any]:
    out = analysis.new_stats()
    out.update(requests=requests, errors=errors, refusals=refusals)
    for value in ttft or []:
        analysis.observe_latency(out["ttft"], value)
    for value in tpot or []:
        analysis.observe_latency(out["tpot"], value)
    return out


def fast(requests: int = 100, **kw: Any) -> dict[str, Any]:
    """A side whose every answer took 100 ms to its first token and 20 ms per token after."""
    return stats(requests, ttft=[0.1] * 30, tpot=[0.02] * 30, **kw)


def test_a_canary_like_the_stable_version_passes() -> None:
    verdict = analysis.judge(fast(errors=1, refusals=1), fast(errors=1, refusals=1), RULES)
    assert verdict.result == "pass" and verdict.reasons == []
    shown = verdict.as_dict()
    assert shown["canary"]["requests"] == 100 and shown["canary"]["error_rate"] == 0.01


def test_too_few_canary_requests_are_inconclusive_whatever_they_did() -> None:
    verdict = analysis.judge(stats(19, errors=19), fast(), RULES)
    assert verdict.result == "inconclusive"
    assert "19 requests" in verdict.reasons[0]
    assert analysis.judge(stats(20, errors=19), fast(), RULES).result == "fail"


def test_the_error_rate_fails_against_the_stable_side_plus_its_margin() -> None:
    failed = analysis.judge(fast(errors=10), fast(errors=2), RULES)
    assert failed.result == "fail"
    assert failed.reasons == ["error rate 10.0% against the stable version's 2.0% (margin 2.0%)"]
    # 3 % against 2 % + 2 %: within the margin.
    assert analysis.judge(fast(errors=3), fast(errors=2), RULES).result == "pass"
    # 7 % is above the absolute 5 %, but the stable side (6 %) can be compared: it decides.
    assert analysis.judge(fast(errors=7), fast(errors=6), RULES).result == "pass"


def test_one_error_alone_never_fails_a_window() -> None:
    # 1 of 20 is 5 % against 0 %: far over the margin, but a single failed request.
    assert analysis.judge(stats(20, errors=1), fast(1000), RULES).result == "pass"
    assert analysis.judge(stats(20, errors=analysis.MIN_ERRORS), fast(1000),
                          RULES).result == "fail"


def test_without_enough_stable_requests_the_absolute_error_rate_decides() -> None:
    few_stable = fast(RULES.min_requests - 1)
    failed = analysis.judge(fast(errors=6), few_stable, RULES)
    assert failed.result == "fail"
    assert failed.reasons == ["error rate 6.0% above 5.0%"]
    assert analysis.judge(fast(errors=4), few_stable, RULES).result == "pass"
    # Nothing served by the stable side at all: the same rule.
    assert analysis.judge(fast(errors=6), stats(0), RULES).result == "fail"


def test_more_guard_refusals_than_the_stable_side_fail_a_window() -> None:
    failed = analysis.judge(fast(refusals=10), fast(refusals=1), RULES)
    assert failed.result == "fail"
    assert failed.reasons[0].startswith("guard refusals 10.0% against the stable version's 1.0%")
    assert analysis.judge(fast(refusals=5), fast(refusals=1), RULES).result == "pass"


def test_a_slower_first_token_fails_a_window() -> None:
    slow = stats(100, ttft=[0.5] * 30, tpot=[0.02] * 30)
    failed = analysis.judge(slow, fast(), RULES)
    assert failed.result == "fail"
    assert len(failed.reasons) == 1 and failed.reasons[0].startswith("time to first token p95")
    # x1.2 is within the allowed x1.5 (read to a bucket, 25 %).
    assert analysis.judge(stats(100, ttft=[0.12] * 30, tpot=[0.02] * 30), fast(),
                          RULES).result == "pass"


def test_latency_differences_under_the_slack_never_fail() -> None:
    # Three times slower, but 20 ms apart: noise on small answers.
    canary = stats(100, ttft=[0.03] * 30, tpot=[0.006] * 30)
    stable = stats(100, ttft=[0.01] * 30, tpot=[0.002] * 30)
    assert analysis.judge(canary, stable, RULES).result == "pass"
    assert analysis.judge(canary, stable, RULES.model_copy(update={"latency_slack_s": 0.0})
                          ).result == "fail"


def test_each_latency_is_judged_on_its_own_samples() -> None:
    # Streams of one token each: a time to first token, no time per output token.
    one_token = analysis.judge(stats(100, ttft=[0.5] * 30), stats(100, ttft=[0.1] * 30), RULES)
    assert one_token.result == "fail"
    assert one_token.reasons[0].startswith("time to first token p95")
    # Mostly whole answers (time per token only) and two streams: the slow tokens count.
    mostly_whole = analysis.judge(stats(100, ttft=[0.1] * 2, tpot=[0.5] * 30),
                                  stats(100, ttft=[0.1] * 2, tpot=[0.05] * 30), RULES)
    assert mostly_whole.result == "fail"
    assert mostly_whole.reasons[0].startswith("time per output token p95")
    # Too few samples of a latency: not compared.
    assert analysis.judge(stats(100, ttft=[0.5] * 4), stats(100, ttft=[0.1] * 30),
                          RULES).result == "pass"


def test_two_gateways_windows_add_up_exactly() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-2, 1) for _ in range(400)]
    a = stats(250, errors=3, refusals=1, ttft=samples[:150], tpot=samples[150:200])
    b = stats(150, errors=2, refusals=4, ttft=samples[200:350], tpot=samples[350:])
    merged = analysis.merge(analysis.merge(analysis.new_stats(), a), b)
    whole = stats(400, errors=5, refusals=5, ttft=samples[:150] + samples[200:350],
                  tpot=samples[150:200] + samples[350:])
    assert merged == whole


def test_the_p95_is_read_to_within_one_bucket() -> None:
    rng = random.Random(11)
    for mu in (-5.0, -2.0, 0.0, 2.0):
        sample = [rng.lognormvariate(mu, 0.8) for _ in range(1000)]
        hist: dict[str, int] = {}
        for value in sample:
            analysis.observe_latency(hist, value)
        true_p95 = sorted(sample)[math.ceil(0.95 * len(sample)) - 1]
        read = analysis.quantile(hist, 0.95)
        assert read is not None
        assert true_p95 <= read < true_p95 * 1.25, (mu, true_p95, read)
    assert analysis.quantile({}, 0.95) is None


# -- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stable", [{"v1": 100}, {"v1": 50, "v2": 50}, {"v1": 70, "v2": 30},
                                    {"v1": 34, "v2": 33, "v3": 33}, {"v1": 1, "v2": 1, "v3": 98},
                                    {"v1": 60, "v2": 25, "v3": 15}, {"v1": 100, "old": 0}])
def test_a_steps_weights_are_whole_percents_adding_up_to_100(stable: dict[str, int]) -> None:
    total = sum(stable.values())
    for share in range(1, 101):
        weights = canary_weights(stable, "new", share)
        assert sum(weights.values()) == 100, (stable, share, weights)
        assert weights["new"] == share
        assert set(weights) == {"new"} | {v for v, w in stable.items() if w > 0}
        for version, got in weights.items():
            if version != "new":  # each stable version keeps its proportion, to a percent
                assert abs(got - (100 - share) * stable[version] / total) <= 1


def test_the_last_step_sends_everything_to_the_canary() -> None:
    assert canary_weights({"v1": 60, "v2": 40}, "v3", 100) == {"v3": 100, "v1": 0, "v2": 0}
    assert canary_weights({"v1": 100}, "v2", 100) == {"v2": 100, "v1": 0}


# -- recorder ---------------------------------------------------------------------------------

T0 = 1_700_000_000.0
WINDOW_S = 60.0


def record(state: str = "canary", step: int = 1, started: float | None = T0,
           model: str = MODEL, weights: dict[str, int] | None = None,
           rollout_id: str = "r1") -> RolloutRecord:
    policy = RolloutPolicy(steps=[5, 25, 50, 100])
    policy.analysis.window_s = WINDOW_S
    return RolloutRecord(
        id=rollout_id, model=model, version="v2", state=state, paused=False, step=step,
        step_started=started, plan=policy.model_dump(mode="json"), weights=weights,
        stable={"v1": 100}, command=None, command_by=None, reason=None, detail={},
        created_by="test", created_at=T0 - 100, updated_at=T0)


def outcome(at: float, version: str | None = "v2", status: int = 200,
            model: str | None = MODEL, ttft_s: float | None = 0.2, completion_tokens: int = 9,
            duration_s: float = 1.0, decisions: dict[str, object] | None = None) -> Outcome:
    return Outcome(request_id=f"req-{at}-{version}", endpoint="chat", status=status,
                   duration_s=duration_s, wall_time=at, model=model, version=version,
                   ttft_s=ttft_s, completion_tokens=completion_tokens,
                   decisions=decisions or {})


def hist(*values: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        analysis.observe_latency(out, value)
    return out


def cells(recorder: RolloutRecorder) -> dict[tuple[str, int, int, str], dict[str, Any]]:
    """What ``pending`` hands over, by (rollout, step, window, version)."""
    return {(rid, row.step, row.window, row.version): row.stats
            for rid, rows in recorder.pending().items() for row in rows}


def test_requests_are_counted_in_their_window_of_the_step() -> None:
    recorder = RolloutRecorder()
    recorder.follow([record()])
    recorder.observe(outcome(T0 + 5))  # streamed: 0.2 s to the first token, 9 tokens in 1 s
    recorder.observe(outcome(T0 + 59, status=502, ttft_s=None, completion_tokens=0))
    recorder.observe(outcome(T0 + 30, version="v1", decisions={"blocked": "pii"},
                             ttft_s=None, completion_tokens=10, duration_s=0.5))  # whole
    recorder.observe(outcome(T0 + 61, version="v1"))
    recorder.observe(outcome(T0 - 1))  # before the step started
    got = cells(recorder)
    assert set(got) == {("r1", 1, 0, "v2"), ("r1", 1, 0, "v1"), ("r1", 1, 1, "v1")}
    assert got[("r1", 1, 0, "v2")] == {"requests": 2, "errors": 1, "refusals": 0,
                                       "ttft": hist(0.2), "tpot": hist(0.1)}
    assert got[("r1", 1, 0, "v1")] == {"requests": 1, "errors": 0, "refusals": 1,
                                       "ttft": {}, "tpot": hist(0.05)}
    assert got[("r1", 1, 1, "v1")]["requests"] == 1


def test_only_models_in_a_canary_step_are_counted() -> None:
    recorder = RolloutRecorder()
    recorder.follow([record(), record(state="evaluating", model="minilm-embed",
                                      rollout_id="r2")])
    recorder.observe(outcome(T0 + 5, model="minilm-embed"))  # its rollout is not in a step
    recorder.observe(outcome(T0 + 5, model="other"))  # no rollout
    recorder.observe(outcome(T0 + 5, model=None))  # named no model we serve
    recorder.observe(outcome(T0 + 5, version=None))  # never reached a version
    recorder.attempt_failed("other", "v1")
    assert recorder.pending() == {}


def test_a_failed_attempt_counts_as_a_request_and_an_error() -> None:
    recorder = RolloutRecorder()
    recorder.follow([record(started=time.time() - 5)])
    recorder.attempt_failed(MODEL, "v2")
    recorder.attempt_failed(MODEL, "v2")
    got = cells(recorder)
    assert list(got) == [("r1", 1, 0, "v2")]
    assert got[("r1", 1, 0, "v2")] == {"requests": 2, "errors": 2, "refusals": 0, "ttft": {},
                                       "tpot": {}}


def test_pending_hands_each_changed_window_once_with_its_whole_count() -> None:
    recorder = RolloutRecorder()
    recorder.follow([record()])
    recorder.observe(outcome(T0 + 5))
    recorder.observe(outcome(T0 + 65))
    assert set(cells(recorder)) == {("r1", 1, 0, "v2"), ("r1", 1, 1, "v2")}
    assert recorder.pending() == {}
    recorder.observe(outcome(T0 + 70))
    again = cells(recorder)  # only window 1 changed; its row is the total, not the difference
    assert list(again) == [("r1", 1, 1, "v2")]
    assert again[("r1", 1, 1, "v2")]["requests"] == 2


def test_a_new_step_counts_afresh_and_no_rollout_stops_the_counting() -> None:
    recorder = RolloutRecorder()
    recorder.follow([record(step=1)])
    recorder.observe(outcome(T0 + 5))
    recorder.pending()
    recorder.follow([record(step=2, started=T0 + 300)])
    recorder.observe(outcome(T0 + 305))
    got = cells(recorder)
    assert list(got) == [("r1", 2, 0, "v2")] and got[("r1", 2, 0, "v2")]["requests"] == 1
    recorder.follow([])
    recorder.observe(outcome(T0 + 310))
    recorder.attempt_failed(MODEL, "v2")
    assert recorder.pending() == {}


# -- split and pick ---------------------------------------------------------------------------


def chat(*messages: tuple[str, str]) -> ChatRequest:
    return ChatRequest.model_validate({"model": MODEL, "messages": [
        {"role": role, "content": content} for role, content in messages]})


def test_a_conversation_keeps_its_bucket_from_turn_to_turn() -> None:
    first = chat(("system", "Be brief."), ("user", "Plan a trip to Lyon."))
    later = chat(("system", "Be brief."), ("user", "Plan a trip to Lyon."),
                 ("assistant", "Day 1: the old town."), ("user", "And day 2?"))
    assert split.bucket("acme", first) == split.bucket("acme", later)
    assert 0 <= split.bucket("acme", first) < split.BUCKETS
    other = chat(("system", "Be brief."), ("user", "Plan a trip to Nice."))
    assert split.bucket("acme", other) != split.bucket("acme", first)
    prompt = CompletionRequest.model_validate({"model": MODEL, "prompt": "Once upon"})
    assert split.bucket("acme", prompt) == split.bucket(
        "acme", CompletionRequest.model_validate({"model": MODEL, "prompt": "Once upon",
                                                  "max_tokens": 5}))


def test_clients_with_the_same_conversation_land_apart() -> None:
    openers = [f"Summarise report {i}." for i in range(50)]
    same = sum(split.bucket("acme", chat(("user", o))) == split.bucket("globex", chat(("user", o)))
               for o in openers)
    assert same <= 1


def test_conversations_spread_evenly_over_the_buckets() -> None:
    buckets = [split.bucket_of("acme", f"conversation {i}".encode()) for i in range(10_000)]
    under = sum(b < split.BUCKETS // 2 for b in buckets) / len(buckets)
    assert abs(under - 0.5) <= 0.02
    tenth = sum(b < split.BUCKETS // 10 for b in buckets) / len(buckets)
    assert abs(tenth - 0.1) <= 0.02


def two_versions(tmp_path: Path, traffic: dict[str, int]) -> EnginePool:
    """demo-chat with a second serving version v2 (another port), listed after v1."""
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v2 = copy.deepcopy(data["versions"][0])
    v2["name"] = "v2"
    v2["engine"]["port"] = data["versions"][0]["engine"]["port"] + 100
    data["versions"].append(v2)
    data["traffic"] = traffic
    (tmp_path / "demo-chat.yaml").write_text(yaml.safe_dump(data))
    pool = EnginePool(load_manifests(tmp_path))
    for replica in pool.engines:
        replica.healthy = True
    return pool


def version_for(route: ModelRoute, bucket: int, tried: tuple[Replica, ...] = ()) -> str | None:
    replica, _ = route.pick(tried, None, None, bucket)
    if replica is None:
        return None
    replica.in_flight -= 1  # released at once: only the choice matters here
    return replica.deployment.version.name


def test_buckets_go_to_versions_in_the_manifests_order(tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    route.weights = {"v1": 75, "v2": 25}
    assert route.split()
    assert [version_for(route, b) for b in (0, 2499, 7499, 7500, 9999)] == [
        "v1", "v1", "v1", "v2", "v2"]
    for b in range(0, split.BUCKETS, 37):  # the same conversation, the same version
        assert len({version_for(route, b) for _ in range(3)}) == 1


def test_raising_the_canarys_weight_only_moves_conversations_to_it(tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    route.weights = {"v1": 75, "v2": 25}
    before = [version_for(route, b) for b in range(split.BUCKETS)]
    route.weights = {"v1": 50, "v2": 50}
    after = [version_for(route, b) for b in range(split.BUCKETS)]
    moved = [b for b in range(split.BUCKETS) if before[b] != after[b]]
    assert all(before[b] == "v1" and after[b] == "v2" for b in moved)
    assert len(moved) == 2500
    assert after.count("v2") == 5000


def test_a_conversations_version_without_a_replica_sends_it_to_the_other(
        tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    route.weights = {"v1": 75, "v2": 25}
    v2_replica = route.version("v2").replicas[0]  # type: ignore[union-attr]
    assert version_for(route, 9000) == "v2"
    assert version_for(route, 9000, tried=(v2_replica,)) == "v1"  # its attempt failed
    v2_replica.healthy = False
    assert version_for(route, 9000) == "v1"
    assert version_for(route, 100) == "v1"


def test_without_rollout_weights_the_manifests_split_routes(tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    assert route.weights is None and not route.split()
    assert {version_for(route, b) for b in (0, 5000, 9999)} == {"v1"}
    route.weights = {"v1": 0, "v2": 100}
    assert {version_for(route, b) for b in (0, 5000, 9999)} == {"v2"}
    route.weights = None
    assert {version_for(route, b) for b in (0, 5000, 9999)} == {"v1"}
    split_route = two_versions(tmp_path, {"v1": 40, "v2": 60}).routes[MODEL]
    assert split_route.split()
    assert [version_for(split_route, b) for b in (3999, 4000)] == ["v1", "v2"]


# -- follower ---------------------------------------------------------------------------------


def follower(tmp_path: Path) -> tuple[RolloutFollower, EnginePool, GatewayMetrics]:
    pool = two_versions(tmp_path, {"v1": 100, "v2": 0})
    metrics = GatewayMetrics()
    # apply() never touches the database: an engine that is never connected.
    repo = RolloutRepository(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"))
    return RolloutFollower(repo, pool, RolloutRecorder(), metrics, "gw-test"), pool, metrics


def weight(metrics: GatewayMetrics, version: str) -> float | None:
    return metrics.registry.get_sample_value("enclave_model_version_weight",
                                             {"model": MODEL, "version": version})


def step_share(metrics: GatewayMetrics) -> float | None:
    return metrics.registry.get_sample_value("enclave_rollout_step_percent", {"model": MODEL})


def test_the_follower_routes_by_the_rollouts_weights_and_shows_them(tmp_path: Path) -> None:
    follow, pool, metrics = follower(tmp_path)
    route = pool.routes[MODEL]
    follow.apply([])  # no rollout: the manifest's split
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (100, 0, 0)

    follow.apply([record(step=1, weights={"v1": 75, "v2": 25})])
    assert route.weights == {"v1": 75, "v2": 25}
    assert version_for(route, 9999) == "v2"
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (75, 25, 25)

    follow.apply([record(step=2, weights={"v1": 50, "v2": 50})])
    assert route.weights == {"v1": 50, "v2": 50}
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (50, 50, 50)

    follow.apply([])  # the rollout ended: the manifest's split again
    assert route.weights is None
    assert version_for(route, 9999) == "v1"
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (100, 0, 0)


def test_before_its_first_step_a_rollout_routes_by_the_manifest(tmp_path: Path) -> None:
    follow, pool, metrics = follower(tmp_path)
    follow.apply([record(state="evaluating", step=-1, started=None)])
    assert pool.routes[MODEL].weights is None
    assert version_for(pool.routes[MODEL], 9999) == "v1"
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (100, 0, 0)
    # Promoting: all traffic on the canary, no step any more.
    follow.apply([record(state="promoting", step=3, weights={"v2": 100, "v1": 0})])
    assert version_for(pool.routes[MODEL], 0) == "v2"
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (0, 100, 0)


def test_a_version_gone_from_the_routes_loses_its_series(tmp_path: Path) -> None:
    follow, pool, metrics = follower(tmp_path)
    follow.apply([])
    assert weight(metrics, "v2") == 0
    pool.update(load_manifests(REPO / "models"))  # v1 only
    pool._drop_removed()  # what the pool's watch does once the retired version is idle
    assert [v.deployment.version.name for v in pool.routes[MODEL].versions] == ["v1"]
    follow.apply([])
    assert weight(metrics, "v1") == 100
    assert weight(metrics, "v2") is None


def test_each_steps_weights_route_that_share_of_conversations(tmp_path: Path) -> None:
    """The split a step gives, applied by the follower, is what the router does: over the
    buckets each version gets its share exactly, the canary the top of the range."""
    follow, pool, _ = follower(tmp_path)
    route = pool.routes[MODEL]
    for share in (5, 25, 50, 100):
        follow.apply([record(weights=canary_weights({"v1": 100}, "v2", share))])
        got = [version_for(route, b) for b in range(0, split.BUCKETS, 10)]
        assert got.count("v2") == share * 10
        assert list(itertools.dropwhile(lambda v: v == "v1", got)) == ["v2"] * (share * 10)
