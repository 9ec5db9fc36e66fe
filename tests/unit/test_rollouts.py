"""A rollout's parts that need no engine and no database: judging a window (``analysis``), a
step's traffic split (``weights``), counting each version's requests in windows
(``recorder``), keeping a conversation on one version (``upstream.split``,
``ModelRoute.pick``), a gateway's routes and metrics following the rollout (``follower``), and
the controller resuming a paused step (``controller``, on a stand-in for the database).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import random
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from serving.contract import ChatRequest, CompletionRequest
from serving.domain.outcome import Outcome
from serving.domain.rollout import Analysis, RolloutPolicy
from serving.metrics import GatewayMetrics
from serving.rollouts import analysis
from serving.rollouts import follower as follower_module
from serving.rollouts.controller import RolloutController
from serving.rollouts.follower import RolloutFollower
from serving.rollouts.recorder import RolloutRecorder
from serving.rollouts.weights import canary_weights
from serving.storage.db import create_engine
from serving.storage.manifests import load_manifests
from serving.storage.rollouts import RolloutRecord, RolloutRepository, WindowRow
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


def hamilton_ok(stable: dict[str, int], share: int, got: dict[str, int]) -> bool:
    """``got`` is a largest-remainder (Hamilton) split of ``100 - share`` over the stable
    versions with weight: each gets its exact quota rounded down, plus one for those with the
    largest remainders (any of them where remainders tie), as many as the rounding lost."""
    others = {v: w for v, w in stable.items() if w > 0}
    rest, total = 100 - share, sum(others.values())
    quota = {v: Fraction(rest * w, total) for v, w in others.items()}
    floor = {v: math.floor(q) for v, q in quota.items()}
    extra = {v: got[v] - floor[v] for v in others}
    if any(e not in (0, 1) for e in extra.values()):
        return False
    if sum(extra.values()) != rest - sum(floor.values()):
        return False
    up = [quota[v] - floor[v] for v in others if extra[v]]
    down = [quota[v] - floor[v] for v in others if not extra[v]]
    return not up or not down or min(up) >= max(down)


@pytest.mark.parametrize("stable", [{"v1": 100}, {"v1": 50, "v2": 50}, {"v1": 70, "v2": 30},
                                    {"v1": 34, "v2": 33, "v3": 33}, {"v1": 1, "v2": 1, "v3": 98},
                                    {"v1": 60, "v2": 25, "v3": 15}, {"v1": 100, "old": 0},
                                    {"v1": 3, "v2": 3, "v3": 3}, {"a": 17, "b": 29, "c": 54}])
def test_a_steps_weights_are_a_largest_remainder_split_adding_up_to_100(
        stable: dict[str, int]) -> None:
    for share in range(1, 101):
        weights = canary_weights(stable, "new", share)
        assert sum(weights.values()) == 100, (stable, share, weights)
        assert weights["new"] == share
        assert set(weights) == {"new"} | {v for v, w in stable.items() if w > 0}
        assert hamilton_ok(stable, share, weights), (stable, share, weights)


def test_the_rounding_goes_to_the_largest_remainders() -> None:
    # 95 % over 60/25/15: 57, 23.75, 14.25: the lost percent goes to the .75.
    assert canary_weights({"v1": 60, "v2": 25, "v3": 15}, "v4", 5) == {
        "v4": 5, "v1": 57, "v2": 24, "v3": 14}
    # 67 %: 40.2, 16.75, 10.05.
    assert canary_weights({"v1": 60, "v2": 25, "v3": 15}, "v4", 33) == {
        "v4": 33, "v1": 40, "v2": 17, "v3": 10}
    # 95 % over 1/1/98: 0.95, 0.95, 93.1: the two small versions get their percent, not v3.
    assert canary_weights({"v1": 1, "v2": 1, "v3": 98}, "v4", 5) == {
        "v4": 5, "v1": 1, "v2": 1, "v3": 93}
    # 50 % over 34/33/33: 17 exactly, and 16.5 twice: one of the two gets the lost percent.
    got = canary_weights({"v1": 34, "v3": 33, "v4": 33}, "v2", 50)
    assert got["v2"] == 50 and got["v1"] == 17 and sorted([got["v3"], got["v4"]]) == [16, 17]


def test_the_last_step_sends_everything_to_the_canary() -> None:
    assert canary_weights({"v1": 60, "v2": 40}, "v3", 100) == {"v3": 100, "v1": 0, "v2": 0}
    assert canary_weights({"v1": 100}, "v2", 100) == {"v2": 100, "v1": 0}


# -- recorder ---------------------------------------------------------------------------------

T0 = 1_700_000_000.0
WINDOW_S = 60.0


def record(state: str = "canary", step: int = 1, started: float | None = T0,
           model: str = MODEL, weights: dict[str, int] | None = None,
           rollout_id: str = "r1", paused: bool = False,
           stable: dict[str, int] | None = None) -> RolloutRecord:
    policy = RolloutPolicy(steps=[5, 25, 50, 100])
    policy.analysis.window_s = WINDOW_S
    return RolloutRecord(
        id=rollout_id, model=model, version="v2", state=state, paused=paused, step=step,
        step_started=started, plan=policy.model_dump(mode="json"), weights=weights,
        stable=stable or {"v1": 100}, command=None, command_by=None, reason=None, detail={},
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


def test_a_paused_rollout_counts_nothing_until_resumed() -> None:
    recorder = RolloutRecorder()
    now = time.time()
    recorder.follow([record(started=now - 5)])
    recorder.observe(outcome(now))
    assert list(cells(recorder)) == [("r1", 1, 0, "v2")]
    recorder.follow([record(started=now - 5, paused=True)])
    recorder.observe(outcome(now + 1))
    recorder.observe(outcome(now + 2, version="v1"))
    recorder.attempt_failed(MODEL, "v2")
    assert recorder.pending() == {}
    recorder.follow([record(started=now - 5)])  # resumed: counted again
    recorder.observe(outcome(now + 3))
    assert list(cells(recorder)) == [("r1", 1, 0, "v2")]


# -- split and pick ---------------------------------------------------------------------------


def chat(*messages: tuple[str, str]) -> ChatRequest:
    return ChatRequest.model_validate({"model": MODEL, "messages": [
        {"role": role, "content": content} for role, content in messages]})


def test_a_conversation_keeps_its_hash_from_turn_to_turn() -> None:
    first = chat(("system", "Be brief."), ("user", "Plan a trip to Lyon."))
    later = chat(("system", "Be brief."), ("user", "Plan a trip to Lyon."),
                 ("assistant", "Day 1: the old town."), ("user", "And day 2?"))
    assert split.bucket("acme", first) == split.bucket("acme", later)
    assert 0 <= split.bucket("acme", first) < 2 ** 64
    other = chat(("system", "Be brief."), ("user", "Plan a trip to Nice."))
    assert split.bucket("acme", other) != split.bucket("acme", first)
    prompt = CompletionRequest.model_validate({"model": MODEL, "prompt": "Once upon"})
    assert split.bucket("acme", prompt) == split.bucket(
        "acme", CompletionRequest.model_validate({"model": MODEL, "prompt": "Once upon",
                                                  "max_tokens": 5}))
    # The whole 64-bit hash, not a bucket: its digits above the bucket are used too.
    hashes = [split.bucket_of("acme", f"opener {i}".encode()) for i in range(100)]
    assert max(hashes) >= split.BUCKETS ** 2
    assert len({h // split.BUCKETS % split.BUCKETS for h in hashes}) > 90


def test_clients_with_the_same_conversation_land_apart() -> None:
    openers = [f"Summarise report {i}." for i in range(50)]
    same = sum(split.bucket("acme", chat(("user", o))) % split.BUCKETS
               == split.bucket("globex", chat(("user", o))) % split.BUCKETS for o in openers)
    assert same <= 1


def test_conversations_spread_evenly_over_both_parts_independently() -> None:
    hashes = [split.bucket_of("acme", f"conversation {i}".encode()) for i in range(10_000)]
    low = [h % split.BUCKETS for h in hashes]
    high = [h // split.BUCKETS % split.BUCKETS for h in hashes]
    for part in (low, high):
        assert abs(sum(b < split.BUCKETS // 2 for b in part) / len(part) - 0.5) <= 0.02
        assert abs(sum(b < split.BUCKETS // 10 for b in part) / len(part) - 0.1) <= 0.02
    # Independent: where a conversation's bucket lies says nothing about its second part.
    for fraction in (0.05, 0.25, 0.5):
        cut = int(fraction * split.BUCKETS)
        above = [hi for lo, hi in zip(low, high, strict=True) if lo >= cut]
        assert abs(sum(hi < split.BUCKETS // 2 for hi in above) / len(above) - 0.5) <= 0.02
        assert abs(sum(hi < split.BUCKETS // 4 for hi in above) / len(above) - 0.25) <= 0.02


def conversation(low: int, high: int = 0) -> int:
    """A conversation hash whose bucket is ``low`` and whose second part is ``high``."""
    return 12345 * split.BUCKETS ** 2 + high * split.BUCKETS + low  # digits above: ignored


def two_versions(tmp_path: Path, traffic: dict[str, int]) -> EnginePool:
    """demo-chat serving the versions ``traffic`` names, listed in its order: copies of v1,
    v<n> on v1's port + 100 * (n - 1)."""
    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v1 = data["versions"][0]
    data["versions"] = []
    for name in traffic:
        version = copy.deepcopy(v1)
        version["name"] = name
        version["engine"]["port"] = v1["engine"]["port"] + 100 * (int(name[1:]) - 1)
        data["versions"].append(version)
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


def test_a_split_without_a_rollout_goes_by_the_second_part_in_the_manifests_order(
        tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    route.weights = {"v1": 75, "v2": 25}  # no canary: a traffic split, by the second part
    assert route.split()
    for low in (0, 1, 5000, 9999):  # the bucket (the canary's part) plays no role
        assert [version_for(route, conversation(low, h)) for h in (0, 2499, 7499, 7500, 9999)
                ] == ["v1", "v1", "v1", "v2", "v2"]
    for b in range(0, split.BUCKETS, 37):  # the same conversation, the same version
        assert len({version_for(route, conversation(b, b)) for _ in range(3)}) == 1


def rollout(route: ModelRoute, weights: dict[str, int], stable: dict[str, int],
            canary: str = "v2") -> None:
    """What the follower puts on a route during a rollout's step."""
    route.weights, route.stable, route.canary = weights, stable, canary


def test_the_canary_takes_the_lowest_buckets_and_the_rest_split_by_the_second_part(
        tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 50, "v2": 0, "v3": 50}).routes[MODEL]
    rollout(route, {"v1": 38, "v2": 25, "v3": 37}, {"v1": 50, "v3": 50})
    for high in (0, 4999, 5000, 9999):  # the canary's buckets, whatever the second part
        assert version_for(route, conversation(0, high)) == "v2"
        assert version_for(route, conversation(2499, high)) == "v2"
    for low in (2500, 6000, 9999):  # above them: the second part decides, half and half
        assert [version_for(route, conversation(low, high)) for high in (0, 4999, 5000, 9999)
                ] == ["v1", "v1", "v3", "v3"]
    # The stable versions' proportions at the rollout's start decide, not the step's rounding.
    rollout(route, {"v1": 52, "v2": 25, "v3": 23}, {"v1": 70, "v3": 30})
    assert [version_for(route, conversation(5000, high)) for high in (6999, 7000)
            ] == ["v1", "v3"]
    assert version_for(route, conversation(2499, 9999)) == "v2"


def test_raising_the_canarys_weight_only_moves_conversations_to_it(tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    hashes = [conversation(b, b * 7919 % split.BUCKETS) for b in range(split.BUCKETS)]
    rollout(route, {"v1": 75, "v2": 25}, {"v1": 100})
    before = [version_for(route, h) for h in hashes]
    assert before.count("v2") == 2500
    rollout(route, {"v1": 50, "v2": 50}, {"v1": 100})
    after = [version_for(route, h) for h in hashes]
    moved = [i for i in range(split.BUCKETS) if before[i] != after[i]]
    assert all(before[i] == "v1" and after[i] == "v2" for i in moved)
    assert len(moved) == 2500
    assert after.count("v2") == 5000


@pytest.mark.parametrize("order", [("v1", "v3", "v2"), ("v2", "v1", "v3"),
                                   ("v1", "v2", "v3")])
@pytest.mark.parametrize("stable", [{"v1": 50, "v3": 50}, {"v1": 70, "v3": 30},
                                    {"v1": 20, "v3": 80}])
def test_no_step_moves_a_conversation_from_one_stable_version_to_another(
        tmp_path: Path, stable: dict[str, int], order: tuple[str, ...]) -> None:
    """The canary v2 listed after, before or between the stable versions v1 and v3 (the
    manifest's order): each step's conversations either stay where they were or go to the
    canary, and every version gets its share."""
    traffic = {**stable, "v2": 0}
    follow, pool, _ = follower(tmp_path, {v: traffic[v] for v in order})
    route = pool.routes[MODEL]
    rng = random.Random(5)
    hashes = [split.bucket_of(f"client-{rng.randrange(50)}", f"chat {rng.random()}".encode())
              for _ in range(10_000)]
    previous: list[str | None] | None = None
    for share in (5, 25, 50, 100):
        follow.apply([record(weights=canary_weights(stable, "v2", share), stable=stable)])
        assert route.canary == "v2" and route.stable == stable
        now = [version_for(route, h) for h in hashes]
        n = len(hashes)
        assert abs(now.count("v2") / n - share / 100) <= 0.02, (share, now.count("v2"))
        for version, w in stable.items():
            expected = (100 - share) / 100 * w / 100
            assert abs(now.count(version) / n - expected) <= 0.02, (share, version)
        if previous is not None:
            changed = [(a, b) for a, b in zip(previous, now, strict=True) if a != b]
            assert changed and all(b == "v2" for _, b in changed), set(changed)
            assert all(a != "v2" for a, _ in changed)
        previous = now
    assert set(previous or []) == {"v2"}


def test_a_conversations_version_without_a_replica_sends_it_to_the_other(
        tmp_path: Path) -> None:
    route = two_versions(tmp_path, {"v1": 100, "v2": 0}).routes[MODEL]
    route.weights = {"v1": 75, "v2": 25}
    v2_replica = route.version("v2").replicas[0]  # type: ignore[union-attr]
    assert version_for(route, conversation(0, 9000)) == "v2"
    assert version_for(route, conversation(0, 9000), tried=(v2_replica,)) == "v1"  # it failed
    v2_replica.healthy = False
    assert version_for(route, conversation(0, 9000)) == "v1"
    assert version_for(route, conversation(0, 100)) == "v1"


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
    assert [version_for(split_route, conversation(0, h)) for h in (3999, 4000)] == ["v1", "v2"]


# -- follower ---------------------------------------------------------------------------------


def follower(tmp_path: Path, traffic: dict[str, int] | None = None
             ) -> tuple[RolloutFollower, EnginePool, GatewayMetrics]:
    pool = two_versions(tmp_path, traffic or {"v1": 100, "v2": 0})
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
    assert (route.weights, route.canary, route.stable) == (None, None, None)
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (100, 0, 0)

    follow.apply([record(step=1, weights={"v1": 75, "v2": 25})])
    assert (route.weights, route.canary, route.stable) == ({"v1": 75, "v2": 25}, "v2",
                                                           {"v1": 100})
    # The canary has the lowest quarter of the buckets, whatever the second part.
    assert [version_for(route, conversation(b, 9999)) for b in (0, 2499, 2500, 9999)] == [
        "v2", "v2", "v1", "v1"]
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (75, 25, 25)

    follow.apply([record(step=2, weights={"v1": 50, "v2": 50})])
    assert route.weights == {"v1": 50, "v2": 50} and route.canary == "v2"
    assert [version_for(route, conversation(b)) for b in (0, 4999, 5000, 9999)] == [
        "v2", "v2", "v1", "v1"]
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (50, 50, 50)

    # Rolled back: the last weights were the stable ones, which the manifest says too.
    follow.apply([record(state="rolling_back", step=2, weights={"v1": 100, "v2": 0})])
    follow.apply([])  # the rollout ended: the manifest's split again
    assert (route.weights, route.canary, route.stable) == (None, None, None)
    assert version_for(route, conversation(0)) == "v1"
    assert (weight(metrics, "v1"), weight(metrics, "v2"), step_share(metrics)) == (100, 0, 0)


def test_a_finished_rollouts_weights_hold_until_the_manifest_says_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promoted: until this gateway has re-read the manifest (v2: 100), the rollout's last
    weights route, not the manifest's old split (v1: 100, whose engine is being stopped);
    a manifest that never agrees gives way after HOLD_S."""
    follow, pool, _ = follower(tmp_path)
    route = pool.routes[MODEL]
    follow.apply([record(state="promoting", step=3, weights={"v2": 100, "v1": 0})])
    follow.apply([])
    assert route.weights == {"v2": 100, "v1": 0}
    assert version_for(route, conversation(0, 9999)) == "v2"
    two_versions(tmp_path, {"v1": 0, "v2": 100})  # the manifest changed on disk ...
    pool.update(load_manifests(tmp_path))  # ... and re-read
    for replica in pool.engines:
        replica.healthy = True
    follow.apply([])
    assert route.weights is None and version_for(route, conversation(0, 9999)) == "v2"
    # A manifest that never agrees: the hold ends.
    follow.apply([record(state="promoting", step=3, weights={"v2": 0, "v1": 100})])
    follow.apply([])
    assert route.weights == {"v2": 0, "v1": 100}
    clock = time.monotonic() + follower_module.HOLD_S + 1
    monkeypatch.setattr(follower_module.time, "monotonic", lambda: clock)
    follow.apply([])
    assert route.weights is None


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
    buckets each version gets its share exactly, the canary the bottom of the range."""
    follow, pool, _ = follower(tmp_path)
    route = pool.routes[MODEL]
    for share in (5, 25, 50, 100):
        follow.apply([record(weights=canary_weights({"v1": 100}, "v2", share))])
        got = [version_for(route, conversation(b, b % 97 * 101))
               for b in range(0, split.BUCKETS, 10)]
        assert got == ["v2"] * (share * 10) + ["v1"] * ((100 - share) * 10), share


# -- controller: resuming a paused step -------------------------------------------------------


class RowsOnly:
    """The repository's calls the controller's command and canary step make, kept in memory:
    each transition applied to the record and remembered."""

    def __init__(self, windows: list[WindowRow]) -> None:
        self.rows = windows
        self.moves: list[dict[str, Any]] = []
        self.windows_asked = 0

    async def transition(self, current: RolloutRecord, actor: str, *, state: str | None = None,
                         reason: str | None = None, now: float,
                         done_command: str | None = None, **values: Any) -> RolloutRecord:
        self.moves.append({"state": state, "reason": reason, **values})
        changes: dict[str, Any] = dict(values, updated_at=now)
        if state is not None:
            changes["state"] = state
        if reason is not None:
            changes["reason"] = reason
        if done_command is not None and current.command == done_command:
            changes.update(command=None, command_by=None)
        return dataclasses.replace(current, **changes)

    async def windows(self, rollout_id: str, step: int) -> list[WindowRow]:
        self.windows_asked += 1
        return self.rows


def controller(repo: RowsOnly) -> RolloutController:
    return RolloutController(cast(Any, repo), cast(Any, None), cast(Any, None), None,
                             GatewayMetrics(), cast(Any, None), "test")


def test_resuming_a_canary_step_skips_the_window_the_pause_cut_short(tmp_path: Path) -> None:
    # Paused in window 3 of step 1: windows 0..2 judged (one passed), window 3 cut short.
    paused = dataclasses.replace(record(started=T0, paused=True), command="resume",
                                 command_by="admin:ops",
                                 detail={"judged": 2, "passed": 1,
                                         "paused_at": T0 + 3.5 * WINDOW_S})
    failing = stats(100, errors=50)  # counted in window 3 before the pause: never judged
    repo = RowsOnly([WindowRow(1, 3, "v2", "gw", failing), WindowRow(1, 3, "v1", "gw", fast()),
                     WindowRow(1, 4, "v2", "gw", fast()), WindowRow(1, 4, "v1", "gw", fast())])
    control = controller(repo)
    control.pool = two_versions(tmp_path, {"v1": 100, "v2": 0})  # the canary's replica: up
    before = time.time()
    resumed = asyncio.run(control._command(paused))
    after = time.time()
    assert not resumed.paused and resumed.command is None
    assert resumed.reason == "resumed by admin:ops"
    assert resumed.detail == {"judged": 3, "passed": 1, "paused_at": T0 + 3.5 * WINDOW_S}
    # The next window, 4, starts now: the step goes on (judged + 2) windows in.
    assert resumed.step_started is not None
    assert before - 4 * WINDOW_S <= resumed.step_started <= after - 4 * WINDOW_S
    assert resumed.state == "canary" and resumed.step == 1

    # At once after resuming: nothing to judge (window 4 has just begun).
    asyncio.run(control._canary(resumed))
    assert repo.windows_asked == 0 and len(repo.moves) == 1

    # A window later (and the gateways' flush grace): window 4 alone is judged (it passes);
    # window 3's failures never count.
    later = dataclasses.replace(resumed, step_started=resumed.step_started - WINDOW_S
                                - control.flush_grace_s - 0.01)
    asyncio.run(control._canary(later))
    judged = [m for m in repo.moves[1:] if m["state"] is None]
    assert [m["detail"]["judged"] for m in judged] == [4]
    assert judged[0]["detail"]["passed"] == 2
    assert judged[0]["detail"]["last_window"]["window"] == 4
    assert all(m["state"] != "rolling_back" for m in repo.moves)


def test_resuming_outside_a_canary_step_only_unpauses() -> None:
    paused = dataclasses.replace(record(state="evaluating", step=-1, started=None,
                                        paused=True), command="resume", command_by="admin:ops",
                                 detail={"phase": "eval"})
    repo = RowsOnly([])
    resumed = asyncio.run(controller(repo)._command(paused))
    assert not resumed.paused and resumed.command is None
    assert resumed.step_started is None and resumed.detail == {"phase": "eval"}
    assert repo.moves == [{"state": None, "reason": "resumed by admin:ops", "paused": False}]


def test_a_rollout_and_its_rollback_move_no_conversation_between_stable_versions(
        tmp_path: Path) -> None:
    """Stable v1/v3 split 50/50 by the manifest: when the rollout starts, a conversation either
    stays where it was or goes to the canary; when it is rolled back, each returns where it
    was before the rollout."""
    route = two_versions(tmp_path, {"v1": 50, "v2": 0, "v3": 50}).routes[MODEL]
    rng = random.Random(18)
    hashes = [rng.getrandbits(64) for _ in range(10_000)]
    before = [version_for(route, h) for h in hashes]
    assert abs(before.count("v1") - 5000) < 200
    rollout(route, {"v1": 48, "v2": 5, "v3": 47}, {"v1": 50, "v3": 50})
    during = [version_for(route, h) for h in hashes]
    assert all(d in (b, "v2") for b, d in zip(before, during, strict=True))
    assert abs(during.count("v2") - 500) < 100
    route.weights, route.canary, route.stable = None, None, None  # rolled back
    assert [version_for(route, h) for h in hashes] == before
