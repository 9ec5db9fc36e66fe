"""Starting a rollout and handing operators' commands to the controller (CLI and admin API).

``start`` checks everything that can be checked before the rollout exists (the model and
version are in the manifests, the version is not the one already taking all traffic, the
evaluation set loads, the steps make sense) and writes the ``pending`` row; the controller of
whichever gateway holds the lease takes it from there. ``command`` leaves pause, resume,
promote or abort on the row for the controller to apply.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.domain.manifest import ManifestError
from serving.domain.rollout import check_steps
from serving.evals.sets import EvalSetError, load_set
from serving.storage.manifests import load_manifests
from serving.storage.rollouts import (
    CommandWaiting,
    RolloutEvent,
    RolloutExists,
    RolloutRecord,
    RolloutRepository,
)

COMMANDS = ("pause", "resume", "promote", "abort")


class RolloutRefused(ValueError):
    """A rollout that cannot start, or a command with no rollout to apply to."""

    def __init__(self, message: str, param: str | None = None,
                 kind: str = "invalid") -> None:
        super().__init__(message)
        self.param = param
        self.kind = kind  # invalid | conflict (one under way) | missing (none under way)


@dataclass(frozen=True, slots=True)
class Overrides:
    steps: list[int] | None = None
    step_duration_s: float | None = None
    window_s: float | None = None
    eval_set: str | None = None
    no_eval: bool = False


class RolloutService:
    def __init__(self, repo: RolloutRepository, models_dir: Path, evals_dir: Path) -> None:
        self.repo = repo
        self.models_dir = models_dir
        self.evals_dir = evals_dir

    async def start(self, model: str, version: str, actor: str,
                    overrides: Overrides = Overrides()) -> RolloutRecord:
        plan, stable = await asyncio.to_thread(self._plan, model, version, overrides)
        now = time.time()
        record = RolloutRecord(
            id=os.urandom(8).hex(), model=model, version=version, state="pending",
            paused=False, step=-1, step_started=None, plan=plan, weights=None, stable=stable,
            command=None, command_by=None, reason=f"started by {actor}", detail={},
            created_by=actor, created_at=now, updated_at=now)
        try:
            await self.repo.create(record)
        except RolloutExists:
            active = next((r for r in await self.repo.active() if r.model == model), None)
            where = f" ({active.version}, {active.state})" if active is not None else ""
            raise RolloutRefused(f"model '{model}' has a rollout under way{where}; abort it or "
                                 "wait for it to end", "model", "conflict") from None
        return record

    def _plan(self, model: str, version: str, o: Overrides) -> tuple[dict[str, Any],
                                                                      dict[str, int]]:
        try:
            manifests = load_manifests(self.models_dir)
        except ManifestError as exc:
            raise RolloutRefused(f"the manifests do not load: {exc}") from None
        manifest = next((m for m in manifests if m.name == model), None)
        if manifest is None:
            raise RolloutRefused(f"no model '{model}' in the manifests", "model")
        target = manifest.version(version)
        if target is None:
            raise RolloutRefused(f"model '{model}' has no version '{version}'; import it "
                                 f"first (enclave models import {model} --from DIR "
                                 f"--version {version})", "version")
        if manifest.traffic.get(version, 0) > 0:
            raise RolloutRefused(f"'{version}' takes {manifest.traffic[version]}% of {model}'s "
                                 "traffic already (the manifest's split): a rollout starts "
                                 "from weight 0", "version")
        stable = {d.version.name: d.weight for d in manifest.deployments()
                  if d.weight > 0 and d.version.name != version}
        if not stable:
            raise RolloutRefused(f"{model} has no other version serving traffic", "version")
        if not target.sha256:
            raise RolloutRefused(f"{model}@{version} pins no sha256: import it with `enclave "
                                 "models import` (nothing unpinned is rolled out)", "version")
        policy = manifest.rollout.model_copy(deep=True)
        try:
            if o.steps is not None:
                policy.steps = check_steps(list(o.steps))
        except ValueError as exc:
            raise RolloutRefused(str(exc), "steps") from None
        if o.step_duration_s is not None:
            if not 0 < o.step_duration_s <= 7 * 86400:
                raise RolloutRefused("the step duration is between 1 s and 7 days",
                                     "step_duration")
            policy.step_duration_s = o.step_duration_s
        if o.window_s is not None:
            if not 0 < o.window_s <= 3600:
                raise RolloutRefused("the analysis window is between 1 s and 1 h", "window")
            policy.analysis.window_s = o.window_s
        if o.no_eval:
            policy.eval.set = None
        elif o.eval_set is not None:
            policy.eval.set = o.eval_set
        if policy.eval.set:
            try:
                load_set(self.evals_dir, policy.eval.set)
            except EvalSetError as exc:
                raise RolloutRefused(f"evaluation set: {exc}", "eval") from None
        return policy.model_dump(mode="json"), stable

    async def command(self, model: str, command: str, actor: str) -> RolloutRecord:
        if command not in COMMANDS:
            raise RolloutRefused(f"unknown command '{command}'", "command")
        try:
            record = await self.repo.command(model, command, actor)
        except CommandWaiting:
            raise RolloutRefused(f"an abort of {model}'s rollout is waiting to be applied; "
                                 f"'{command}' cannot replace it", "command",
                                 "conflict") from None
        if record is None:
            raise RolloutRefused(f"model '{model}' has no rollout under way", "model",
                                 "missing")
        return record

    async def status(self, model: str) -> tuple[RolloutRecord, list[RolloutEvent]] | None:
        record = await self.repo.latest(model)
        if record is None:
            return None
        return record, await self.repo.events(record.id)
