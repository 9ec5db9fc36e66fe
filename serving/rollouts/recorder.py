"""Every gateway's counts of each version's requests during a rollout's canary steps.

The request path calls ``observe`` with each request's outcome and ``attempt_failed`` with
each failed attempt (a 5xx or a dead connection that the gateway then retried elsewhere: the
client saw nothing, the canary still failed). Both are a dictionary lookup and return at once
for a model with no rollout in its canary steps. The counts go into the current analysis
window of the current step (windows are counted from the step's start, in wall time, the same
in every gateway); ``pending`` hands the windows changed since the last call to the follower,
which writes them to the state database for the controller to add up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from serving.domain.outcome import Outcome
from serving.rollouts import analysis
from serving.storage.rollouts import RolloutRecord, WindowRow

Key = tuple[str, int, int, str]  # rollout id, step, window, version


@dataclass(frozen=True, slots=True)
class _Window:
    rollout_id: str
    step: int
    started: float  # the step's start, epoch seconds
    window_s: float


class RolloutRecorder:
    def __init__(self) -> None:
        self._active: dict[str, _Window] = {}  # model -> its rollout's current step
        self._cells: dict[Key, dict[str, Any]] = {}
        self._dirty: set[Key] = set()

    def follow(self, records: list[RolloutRecord]) -> None:
        """The rollouts under way now: count for those in a canary step."""
        active = {}
        for r in records:
            # Paused: nothing counted (the windows resume after the pause, see the controller).
            if (r.state == "canary" and not r.paused and r.step >= 0
                    and r.step_started is not None):
                active[r.model] = _Window(r.id, r.step, r.step_started,
                                          float(r.plan["analysis"]["window_s"]))
        self._active = active
        current = {(w.rollout_id, w.step) for w in active.values()}
        for key in [k for k in self._cells if (k[0], k[1]) not in current]:
            if key not in self._dirty:  # written already: no longer needed
                del self._cells[key]

    def _cell(self, model: str | None, version: str, at: float) -> dict[str, Any] | None:
        window = self._active.get(model) if model is not None else None
        if window is None or at < window.started:
            return None
        key = (window.rollout_id, window.step, int((at - window.started) // window.window_s),
               version)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = analysis.new_stats()
        self._dirty.add(key)
        return cell

    def attempt_failed(self, model: str, version: str) -> None:
        if model not in self._active:
            return
        cell = self._cell(model, version, time.time())
        if cell is not None:
            cell["requests"] += 1
            cell["errors"] += 1

    def observe(self, outcome: Outcome) -> None:
        if outcome.model not in self._active or outcome.version is None:
            return
        cell = self._cell(outcome.model, outcome.version, outcome.wall_time)
        if cell is None:
            return
        cell["requests"] += 1
        if outcome.status >= 500:
            cell["errors"] += 1
        if outcome.decisions.get("blocked") is not None:
            cell["refusals"] += 1
        tokens = outcome.completion_tokens or 0
        if outcome.ttft_s is not None:
            analysis.observe_latency(cell["ttft"], outcome.ttft_s)
            if tokens > 1:
                analysis.observe_latency(cell["tpot"], max(0.0, outcome.duration_s
                                                           - outcome.ttft_s) / (tokens - 1))
        elif tokens > 0 and outcome.status == 200:
            analysis.observe_latency(cell["tpot"], outcome.duration_s / tokens)

    def pending(self) -> dict[str, list[WindowRow]]:
        """The windows changed since the last call, by rollout (cumulative counts: the row
        is replaced, never added to)."""
        out: dict[str, list[WindowRow]] = {}
        for key in self._dirty:
            rollout_id, step, window, version = key
            out.setdefault(rollout_id, []).append(
                WindowRow(step, window, version, "", dict(self._cells[key])))
        self._dirty.clear()
        return out

    def requeue(self, rollout_id: str, rows: list[WindowRow]) -> None:
        """Rows that could not be written: sent again with the next ``pending``."""
        for row in rows:
            key = (rollout_id, row.step, row.window, row.version)
            if key in self._cells:
                self._dirty.add(key)
