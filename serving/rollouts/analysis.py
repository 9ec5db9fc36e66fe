"""Comparing the canary with the stable version over one analysis window.

Each side's counts are plain JSON (``Stats``): requests, errors (5xx answers and failed
attempts), guard refusals, and the time to first token and time per output token as sparse
histograms over fixed log-spaced bounds, so that several gateways' windows add up exactly and
a p95 is read from the sum (to within one bucket, 25 %).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from serving.domain.rollout import Analysis

BOUNDS = tuple(0.001 * 1.25 ** i for i in range(64))  # 1 ms .. ~1300 s
MIN_LATENCY_SAMPLES = 5
MIN_ERRORS = 2  # one failed request alone never rolls back


def new_stats() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "refusals": 0, "ttft": {}, "tpot": {}}


def observe_latency(hist: dict[str, int], seconds: float) -> None:
    index = min(bisect.bisect_left(BOUNDS, seconds), len(BOUNDS) - 1)
    key = str(index)
    hist[key] = hist.get(key, 0) + 1


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for name in ("requests", "errors", "refusals"):
        into[name] += int(other.get(name, 0))
    for name in ("ttft", "tpot"):
        for key, count in other.get(name, {}).items():
            into[name][key] = into[name].get(key, 0) + int(count)
    return into


def quantile(hist: dict[str, int], q: float) -> float | None:
    total = sum(hist.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for key in sorted(hist, key=int):
        seen += hist[key]
        if seen >= rank:
            return BOUNDS[int(key)]
    return BOUNDS[-1]


@dataclass(frozen=True, slots=True)
class Side:
    requests: int
    errors: int
    refusals: int
    ttft_p95: float | None
    tpot_p95: float | None
    ttft_samples: int
    tpot_samples: int

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Side:
        return cls(stats["requests"], stats["errors"], stats["refusals"],
                   quantile(stats["ttft"], 0.95), quantile(stats["tpot"], 0.95),
                   sum(stats["ttft"].values()), sum(stats["tpot"].values()))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "refusals": self.refusals,
                "error_rate": round(self.error_rate, 4),
                "refusal_rate": round(self.refusal_rate, 4),
                "ttft_p95_s": _round(self.ttft_p95), "tpot_p95_s": _round(self.tpot_p95)}


@dataclass(slots=True)
class Verdict:
    result: str  # pass | fail | inconclusive
    reasons: list[str] = field(default_factory=list)
    canary: Side | None = None
    stable: Side | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reasons": self.reasons,
                "canary": self.canary.as_dict() if self.canary else None,
                "stable": self.stable.as_dict() if self.stable else None}


def judge(canary_stats: dict[str, Any], stable_stats: dict[str, Any], rules: Analysis
          ) -> Verdict:
    """The window's verdict: ``fail`` names every threshold the canary crossed."""
    canary, stable = Side.of(canary_stats), Side.of(stable_stats)
    verdict = Verdict("pass", canary=canary, stable=stable)
    if canary.requests < rules.min_requests:
        verdict.result = "inconclusive"
        verdict.reasons.append(f"the canary served {canary.requests} requests; "
                               f"{rules.min_requests} are needed to judge a window")
        return verdict
    comparable = stable.requests >= rules.min_requests
    if canary.errors >= MIN_ERRORS:
        if comparable and canary.error_rate > stable.error_rate + rules.error_rate_margin:
            verdict.reasons.append(
                f"error rate {canary.error_rate:.1%} against the stable version's "
                f"{stable.error_rate:.1%} (margin {rules.error_rate_margin:.1%})")
        elif not comparable and canary.error_rate > rules.max_error_rate:
            verdict.reasons.append(f"error rate {canary.error_rate:.1%} above "
                                   f"{rules.max_error_rate:.1%}")
    if comparable and canary.refusals >= MIN_ERRORS and (
            canary.refusal_rate > stable.refusal_rate + rules.refusal_rate_margin):
        verdict.reasons.append(
            f"guard refusals {canary.refusal_rate:.1%} against the stable version's "
            f"{stable.refusal_rate:.1%} (margin {rules.refusal_rate_margin:.1%})")
    if comparable:
        # Each latency on its own samples: streams of one token have a time to first token
        # only, whole (unstreamed) answers a time per output token only.
        for label, mine, theirs, ratio, samples in (
                ("time to first token p95", canary.ttft_p95, stable.ttft_p95,
                 rules.ttft_p95_ratio, min(canary.ttft_samples, stable.ttft_samples)),
                ("time per output token p95", canary.tpot_p95, stable.tpot_p95,
                 rules.tpot_p95_ratio, min(canary.tpot_samples, stable.tpot_samples))):
            if mine is None or theirs is None or samples < MIN_LATENCY_SAMPLES:
                continue
            if mine > theirs * ratio and mine - theirs > rules.latency_slack_s:
                verdict.reasons.append(f"{label} {mine * 1000:.0f} ms against the stable "
                                       f"version's {theirs * 1000:.0f} ms (at most x{ratio})")
    if verdict.reasons:
        verdict.result = "fail"
    return verdict


def _round(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None
