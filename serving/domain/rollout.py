"""A model's rollout policy (the manifest's ``rollout:``) and a rollout's states.

A rollout moves a model's traffic from its serving version(s) (the stable side) to a new
version (the canary) in steps: weights verified, the canary's engines started and healthy, its
evaluation set passed, then each step's share of conversations sent to it while both sides are
compared over the same windows. A window where the canary is worse than the declared
thresholds rolls it back at once; a step whose windows all passed leads to the next; the last
step (100) passed promotes it.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# pending: asked for, no controller has taken it yet. The others in the order they happen.
ACTIVE_STATES = ("pending", "verifying", "starting", "evaluating", "canary", "promoting",
                 "rolling_back")
DONE_STATES = ("promoted", "rolled_back", "failed")
State = Literal["pending", "verifying", "starting", "evaluating", "canary", "promoting",
                "rolling_back", "promoted", "rolled_back", "failed"]
Command = Literal["pause", "resume", "promote", "abort"]


class EvalGate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: str | None = Field(default=None, description="The evaluation set (evals/NAME) the canary "
                            "must pass before it takes traffic; none: no gate")
    min_pass_rate: float = Field(default=0.9, ge=0, le=1)
    max_drop: float = Field(default=0.05, ge=0, le=1, description="How far below the stable "
                            "version's pass rate the canary may be")


class Analysis(BaseModel):
    """What makes a canary worse than the stable version over one window. A window counts only
    when the canary served at least ``min_requests`` in it; the latency comparisons only when
    the stable side did too."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(default=60.0, gt=0, le=3600)
    min_requests: int = Field(default=20, ge=1)
    max_error_rate: float = Field(default=0.05, ge=0, le=1, description="The canary's error rate "
                                  "that fails a window when the stable side cannot be compared")
    error_rate_margin: float = Field(default=0.02, ge=0, le=1, description="How much higher than "
                                     "the stable side's the canary's error rate may be")
    ttft_p95_ratio: float = Field(default=1.5, ge=1, description="The canary's time to first token "
                                  "p95 over the stable side's")
    tpot_p95_ratio: float = Field(default=1.5, ge=1,
                                  description="The same for time per output token")
    latency_slack_s: float = Field(default=0.05, ge=0, description="Latency differences below this "
                                   "never fail a window (noise on small answers)")
    refusal_rate_margin: float = Field(default=0.05, ge=0, le=1, description="How much higher the "
                                       "canary's share of answers refused by a guard may be")


class RolloutPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    step_duration_s: float = Field(default=300.0, gt=0, le=7 * 86400)
    eval: EvalGate = Field(default_factory=EvalGate)
    analysis: Analysis = Field(default_factory=Analysis)
    healthy_timeout_s: float = Field(default=900.0, gt=0, description="How long the canary's "
                                     "engines may take to become healthy")

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps: list[int]) -> list[int]:
        return check_steps(steps)


def check_steps(steps: list[int]) -> list[int]:
    if not steps or steps[-1] != 100:
        raise ValueError("rollout steps must end at 100")
    if any(not 0 < s <= 100 for s in steps) or any(a >= b for a, b in pairwise(steps)):
        raise ValueError("rollout steps are rising percentages, each in 1..100")
    return steps
