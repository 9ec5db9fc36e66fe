"""The rollout controller: moves each rollout under way through its states.

Every gateway runs one; only the holder of the ``rollouts`` lease in the state database acts
(renewed every tick; a gateway that dies loses it after ``LEASE_TTL_S`` and another takes
over where the rows say the rollout is). Long work (hashing weights, an evaluation set) runs
as a task of its own, so the lease keeps being renewed.

pending → verifying (every pinned file hashed; a mismatch fails the rollout naming the file,
before any engine starts) → starting (the version set ``serving`` in its manifest: the
supervisors start its replicas, the gateways route to it at weight 0) → evaluating (the
evaluation set against the canary and the stable version, gated) → canary (step by step; each
finished analysis window judged, a failing one rolls back at once) → promoting (all traffic to
the canary, written to the manifest, then the old versions retired: drained to in-flight 0 and
stopped) → promoted; or rolling_back (the stable weights back, the canary retired) →
rolled_back. An operator's command (pause, resume, promote, abort) is left on the row and
applied here, so that every transition has one author and one audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.audit.trail import AuditTrail
from serving.domain.manifest import Deployment, Manifest, ManifestError
from serving.domain.rollout import Analysis
from serving.engines import control
from serving.engines.environment import EngineEnvironment
from serving.engines.sources import resolve_model_dir
from serving.engines.store import StoreError, verify_tree
from serving.evals.runner import ByModel, ReplicaTarget, Report, Target, gate, run_set
from serving.evals.sets import load_set
from serving.logs import iso_timestamp
from serving.metrics import GatewayMetrics
from serving.rollouts import analysis
from serving.rollouts.weights import canary_weights
from serving.storage.manifest_edit import set_versions
from serving.storage.manifests import load_manifest
from serving.storage.rollouts import RolloutRecord, RolloutRepository, Stale
from serving.upstream.pool import EnginePool, VersionGroup

log = logging.getLogger("enclave.rollouts")
LEASE = "rollouts"
LEASE_TTL_S = 10.0
CONTROLLER = "controller"


@dataclass(frozen=True, slots=True)
class Paths:
    models_dir: Path
    evals_dir: Path
    cache_dir: Path
    engine_env_dir: Path
    supervisor_socket: Path | None


class RolloutController:
    def __init__(self, repo: RolloutRepository, pool: EnginePool, paths: Paths,
                 trail: AuditTrail | None, metrics: GatewayMetrics,
                 engine_client: httpx.AsyncClient, holder: str, *,
                 reload_wait_s: float = 5.0, tick_s: float = 0.5,
                 flush_grace_s: float = 2.0) -> None:
        self.repo = repo
        self.pool = pool
        self.paths = paths
        self.trail = trail
        self.metrics = metrics
        self.client = engine_client
        self.holder = holder
        self.reload_wait_s = reload_wait_s  # every gateway has re-read the manifests by then
        self.tick_s = tick_s
        self.flush_grace_s = flush_grace_s  # the gateways' counts for a window are in by then
        self._jobs: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._stuck: dict[str, str] = {}  # rollout id -> the problem last logged
        self.leading = False

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    log.exception("rollout controller tick failed; trying again")
                await asyncio.sleep(self.tick_s)
        finally:
            for job in self._jobs.values():
                job.cancel()
            if self.leading:
                with contextlib.suppress(Exception):
                    await self.repo.release(LEASE, self.holder)

    async def tick(self) -> None:
        records = await self.repo.active()
        if not records and not self.leading:
            return  # nothing to do: no write to the database for an idle gateway
        now = time.time()
        held = await self.repo.acquire(LEASE, self.holder, LEASE_TTL_S, now)
        if held != self.leading:
            log.info("rollout controller " + ("leading" if held else "standing by"),
                     extra={"holder": self.holder})
            self.leading = held
            if not held:  # another gateway acts now: what was started here is its to redo
                for job in self._jobs.values():
                    job.cancel()
                self._jobs.clear()
        if not held:
            return
        if not records:
            await self.repo.release(LEASE, self.holder)
            self.leading = False
            return
        for record in records:
            try:
                await self.advance(record)
            except Stale:
                continue  # someone else moved it since it was read: read again next tick
            except (ManifestError, OSError) as exc:
                await self._cannot_edit(record, f"cannot change the manifest: {exc}")
            except Exception:  # one broken rollout never holds up the others
                log.exception("rollout step failed", extra={"rollout": record.id})

    async def _cannot_edit(self, record: RolloutRecord, problem: str) -> None:
        current = await self.repo.get(record.id)  # the row as it is now, commands applied
        if current is None or not current.active:
            return
        if current.state in ("promoting", "rolling_back"):  # tried again next tick
            if self._stuck.get(current.id) != problem:
                log.error("rollout stuck", extra={"rollout": current.id, "problem": problem})
                self._stuck[current.id] = problem
            return
        await self._move(current, "failed" if current.state in ("pending", "verifying")
                         else "rolling_back", problem,
                         weights=current.stable if current.weights else None)

    # -- the state machine ------------------------------------------------------------------

    async def advance(self, r: RolloutRecord) -> None:
        if r.command is not None:
            r = await self._command(r)
        if r.paused and r.state in ("starting", "evaluating"):
            return  # held before the canary takes traffic (a running evaluation finishes)
        handler: Callable[[RolloutRecord], Awaitable[None]] | None = {
            "pending": self._pending, "verifying": self._verifying,
            "starting": self._starting, "evaluating": self._evaluating,
            "canary": self._canary, "promoting": self._promoting,
            "rolling_back": self._rolling_back}.get(r.state)
        if handler is not None:
            await handler(r)

    async def _command(self, r: RolloutRecord) -> RolloutRecord:
        cmd, actor = str(r.command), r.command_by or "operator"
        now = time.time()
        if cmd == "pause" and not r.paused:
            return await self._note(r, actor, f"paused by {actor}", done_command=cmd,
                                    paused=True, detail={**r.detail, "paused_at": now})
        if cmd == "resume" and r.paused:
            if r.state != "canary" or r.step_started is None:
                return await self._note(r, actor, f"resumed by {actor}", done_command=cmd,
                                        paused=False)
            # The step goes on where it was: the windows judged before the pause still count;
            # the one the pause cut short is skipped (nothing was counted while paused), and
            # the next one starts now.
            window_s = float(r.plan["analysis"]["window_s"])
            cut = int(r.detail.get("judged", -1)) + 1
            if r.detail.get("paused_at") is not None:  # the window the pause fell in
                cut = max(cut, int((float(r.detail["paused_at"]) - r.step_started)
                                   // window_s))
            return await self._note(r, actor, f"resumed by {actor}", done_command=cmd,
                                    paused=False, step_started=now - (cut + 1) * window_s,
                                    detail={**r.detail, "judged": cut})
        if cmd == "promote" and r.state == "canary":
            return await self._move(r, "promoting", f"promoted by {actor}", actor=actor,
                                    weights=self._all_to(r), done_command=cmd,
                                    detail={**r.detail, "phase": None, "trigger": "manual"})
        if cmd == "abort" and r.state not in ("promoting", "rolling_back"):
            self._cancel_job(r)
            to = "failed" if r.state in ("pending", "verifying") else "rolling_back"
            return await self._move(r, to, f"aborted by {actor}", actor=actor,
                                    weights=r.stable if r.weights else None, done_command=cmd,
                                    detail={**r.detail, "phase": None, "trigger": "manual"})
        # Nothing to do (already paused, too late to abort, promote before the canary
        # steps): the command is dropped, and the history says so.
        return await self._note(r, actor, f"{cmd} by {actor} ignored in state {r.state}"
                                + (" (paused)" if r.paused else ""), done_command=cmd)

    async def _note(self, r: RolloutRecord, actor: str, reason: str, *, done_command: str,
                    **values: Any) -> RolloutRecord:
        """A command applied without a change of state: a history row and an audit record."""
        updated = await self.repo.transition(r, actor, now=time.time(), reason=reason,
                                             done_command=done_command, **values)
        await self._audit(r, updated, actor, reason)
        return updated

    async def _pending(self, r: RolloutRecord) -> None:
        await self._move(r, "verifying", "verifying the weights")

    async def _verifying(self, r: RolloutRecord) -> None:
        job = self._job(r, lambda: asyncio.to_thread(self._verify, r))
        if not job.done():
            return
        self._done(r)
        error = job.exception()
        if error is not None:
            await self._move(r, "failed", f"weights check failed: {error}")
            return
        await asyncio.to_thread(set_versions, self.paths.models_dir, r.model,
                                states={r.version: "serving"})
        await self._move(r, "starting", "weights verified; starting the version's engines",
                         detail={**r.detail, "since": time.time()})

    def _verify(self, r: RolloutRecord) -> None:
        manifest = self._manifest(r.model)
        version = manifest.version(r.version)
        if version is None:
            raise StoreError(f"{r.model} has no version {r.version} any more")
        dep = Deployment(model=r.model, task=manifest.task, version=version, weight=0)
        directory = resolve_model_dir(dep, self.paths.cache_dir,
                                      EngineEnvironment(self.paths.engine_env_dir))
        if not version.sha256:
            raise StoreError(f"{r.model}@{r.version} pins no sha256: import it with "
                             "`enclave models import` (nothing unpinned is rolled out)")
        if version.engine.replicas == 0 and not directory.exists():
            return  # engines elsewhere only: their hosts check their weights
        verify_tree(directory, version.sha256)

    async def _starting(self, r: RolloutRecord) -> None:
        plan = r.plan
        group = self._group(r.model, r.version)
        if group is not None and group.replicas and all(x.healthy for x in group.replicas):
            await self._move(r, "evaluating", "the version's replicas are healthy",
                             detail={**r.detail, "since": time.time()})
            return
        if time.time() - float(r.detail.get("since", r.updated_at)) > plan["healthy_timeout_s"]:
            await self._move(r, "rolling_back", f"the version's replicas were not healthy "
                             f"after {plan['healthy_timeout_s']:.0f} s", weights=None)

    async def _evaluating(self, r: RolloutRecord) -> None:
        gate_plan = r.plan["eval"]
        if not gate_plan.get("set"):
            await self._first_step(r, "no evaluation set: straight to the first step")
            return
        job = self._job(r, lambda: self._evaluate(r))
        if not job.done():
            return
        self._done(r)
        error = job.exception()
        if error is not None:
            await self._move(r, "rolling_back", f"evaluation could not run: {error}",
                             weights=None)
            return
        ok, reason, reports = job.result()
        detail = {**r.detail, "eval": reports}
        if not ok:
            await self._move(r, "rolling_back", f"evaluation gate: {reason}", weights=None,
                             detail=detail)
            return
        await self._first_step(r, f"evaluation gate passed: {reason}", detail)

    async def _evaluate(self, r: RolloutRecord) -> tuple[bool, str, dict[str, Any]]:
        gate_plan = r.plan["eval"]
        eval_set = await asyncio.to_thread(load_set, self.paths.evals_dir, gate_plan["set"])
        canary = self._group(r.model, r.version)
        if canary is None:
            raise RuntimeError("the version has no replicas")
        candidate = await self._run_eval(eval_set, r.model, canary)
        baseline: Report | None = None
        stable_name = max(r.stable, key=lambda v: r.stable[v]) if r.stable else None
        stable = self._group(r.model, stable_name) if stable_name else None
        if stable is not None:
            baseline = await self._run_eval(eval_set, r.model, stable)
        ok, reason = gate(candidate, baseline, gate_plan["min_pass_rate"],
                          gate_plan["max_drop"])
        reports = {"set": eval_set.name, "digest": eval_set.digest,
                   "canary": {"version": r.version, "pass_rate": candidate.pass_rate,
                              "cases": candidate.cases},
                   "stable": None if baseline is None else {
                       "version": stable_name, "pass_rate": baseline.pass_rate,
                       "cases": baseline.cases}}
        return ok, reason, reports

    async def _run_eval(self, eval_set: Any, model: str, group: VersionGroup) -> Report:
        urls = [x.base_url for x in group.replicas if x.healthy]
        if not urls:
            raise RuntimeError(f"no healthy replica of {group.deployment.name}")
        return await run_set(eval_set, ReplicaTarget(self.client, urls, model),
                             embedder=self._embedder(), label=group.deployment.name)

    def _embedder(self) -> ByModel | None:
        """The embedding models served now, for ``similar`` checks (the first is the
        default)."""
        targets: dict[str, Target] = {}
        for name, route in self.pool.routes.items():
            if route.task != "embed":
                continue
            urls = [x.base_url for v in route.versions if route.weight_of(v) > 0
                    for x in v.replicas if x.healthy]
            if urls:
                targets[name] = ReplicaTarget(self.client, urls, name)
        return ByModel(targets, next(iter(targets))) if targets else None

    async def _first_step(self, r: RolloutRecord, reason: str,
                          detail: dict[str, Any] | None = None) -> None:
        now = time.time()
        weight = r.steps[0]
        await self._move(r, "canary", f"{reason}; step 1: {weight}% to {r.version}", step=0,
                         step_started=now, weights=canary_weights(r.stable, r.version, weight),
                         detail={**(detail or r.detail), "judged": -1, "passed": 0})

    async def _canary(self, r: RolloutRecord) -> None:
        started = r.step_started
        if r.paused or started is None:
            return
        rules = Analysis.model_validate(r.plan["analysis"])
        now = time.time()
        group = self._group(r.model, r.version)
        if group is None or not any(x.healthy for x in group.replicas):
            since = float(r.detail.get("down_since") or now)
            if now - since > max(2 * rules.window_s, 30.0):
                await self._move(r, "rolling_back", f"automatic rollback at step {r.step + 1}: "
                                 f"no replica of {r.version} healthy for {now - since:.0f} s",
                                 weights=r.stable, detail={**r.detail, "trigger": "automatic",
                                                           "phase": None})
            elif "down_since" not in r.detail:
                await self.repo.transition(r, CONTROLLER, now=now,
                                           detail={**r.detail, "down_since": since})
            return
        if r.detail.get("down_since") is not None:
            r = await self.repo.transition(r, CONTROLLER, now=now,
                                           detail={**r.detail, "down_since": None})
        # A window is judged once every gateway has written its counts for it.
        current = int((now - started - self.flush_grace_s) // rules.window_s)
        judged = int(r.detail.get("judged", -1))
        passed = int(r.detail.get("passed", 0))
        if current - 1 > judged:
            windows = await self.repo.windows(r.id, r.step)
            for index in range(judged + 1, current):
                canary, stable = analysis.new_stats(), analysis.new_stats()
                for row in windows:
                    if row.window == index:
                        analysis.merge(canary if row.version == r.version else stable,
                                       row.stats)
                verdict = analysis.judge(canary, stable, rules)
                detail = {**r.detail, "judged": index, "last_window": {
                    "step": r.step, "window": index, **verdict.as_dict()}}
                if verdict.result == "fail":
                    await self._move(
                        r, "rolling_back", f"automatic rollback at step {r.step + 1} "
                        f"({r.step_weight}%), window {index + 1}: " + "; ".join(verdict.reasons),
                        weights=r.stable, detail={**detail, "trigger": "automatic",
                                                  "phase": None})
                    return
                passed += verdict.result == "pass"
                r = await self.repo.transition(r, CONTROLLER, now=now,
                                               detail={**detail, "passed": passed})
        if now - started < float(r.plan["step_duration_s"]) or passed == 0:
            return  # the step goes on (or waits for a window with enough traffic)
        if r.step + 1 >= len(r.steps):
            await self._move(r, "promoting", f"step {r.step + 1} ({r.step_weight}%) passed: "
                             "promoting", weights=self._all_to(r),
                             detail={**r.detail, "phase": None, "trigger": "automatic"})
            return
        step = r.step + 1
        weight = r.steps[step]
        await self._move(r, "canary", f"step {r.step + 1} passed; step {step + 1}: {weight}% "
                         f"to {r.version}", step=step, step_started=now,
                         weights=canary_weights(r.stable, r.version, weight),
                         detail={**r.detail, "judged": -1, "passed": 0})

    async def _promoting(self, r: RolloutRecord) -> None:
        others = [v.name for v in self._manifest(r.model).versions
                  if v.name != r.version and v.state == "serving"]
        await self._retire(r, keep=r.version, retire=others, traffic={r.version: 100},
                           done="promoted")

    async def _rolling_back(self, r: RolloutRecord) -> None:
        await self._retire(r, keep=None, retire=[r.version], traffic=None, done="rolled_back")

    async def _retire(self, r: RolloutRecord, *, keep: str | None, retire: list[str],
                      traffic: dict[str, int] | None, done: str) -> None:
        """Weights first (every gateway follows the row within a second), then the manifest's
        traffic, then, once every gateway has re-read it, the retired versions: their
        supervisors drain them (to in-flight 0) and stop them."""
        phase = r.detail.get("phase")
        now = time.time()
        if phase is None:
            if traffic is not None:
                await asyncio.to_thread(set_versions, self.paths.models_dir, r.model,
                                        traffic=traffic)
            await self.repo.transition(r, CONTROLLER, now=now, detail={
                **r.detail, "phase": "reloading", "phase_since": now})
            return
        since = float(r.detail.get("phase_since", now))
        if phase == "reloading":
            if now - since < self.reload_wait_s:
                return
            manifest = self._manifest(r.model)
            retiring = [v for v in retire if (x := manifest.version(v)) is not None
                        and x.state == "serving"]
            if retiring:
                await asyncio.to_thread(set_versions, self.paths.models_dir, r.model,
                                        states=dict.fromkeys(retiring, "retired"))
            await self.repo.transition(r, CONTROLLER, now=now, detail={
                **r.detail, "phase": "draining", "phase_since": now, "retiring": retire})
            return
        if phase == "draining":
            # The versions named when the drain began (the manifest says "retired" by now).
            busy = await self._still_running(r.model, list(r.detail.get("retiring") or retire))
            limit = max((v.engine.shutdown_timeout_s for v in self._manifest(r.model).versions),
                        default=60) + 120
            if busy and now - since < limit:
                return
            trigger = r.detail.get("trigger", "automatic")
            reason = ("promoted: all traffic on " + r.version if done == "promoted"
                      else f"rolled back: {r.version} stopped")
            if busy:
                reason += f" (still running after {limit:.0f} s: {', '.join(busy)})"
            await self._move(r, done, reason, detail={**r.detail, "phase": "done"})
            self.metrics.rollouts_finished.labels(r.model, done, trigger).inc()
            with contextlib.suppress(Exception):
                await self.repo.drop_windows(r.id)

    async def _still_running(self, model: str, versions: list[str]) -> list[str]:
        """Replicas of ``versions`` the supervisor still runs (or this gateway still routes
        to, when no supervisor can be asked)."""
        names = {f"{model}-{v}" for v in versions}
        socket = self.paths.supervisor_socket
        if socket is not None and socket.exists():
            try:
                answer = await asyncio.wait_for(control.request(socket, {"op": "status"}), 5.0)
            except (OSError, ValueError, TimeoutError):
                answer = {}
            replicas = answer.get("replicas")
            if isinstance(replicas, list):
                return [str(x["replica"]) for x in replicas
                        if x.get("deployment") in names
                        and x.get("state") not in ("stopped", "held", "exited")]
        return [x.name for name in names if (g := self.pool.deployment(name)) is not None
                for x in g.replicas if x.in_flight > 0]

    # -- helpers ----------------------------------------------------------------------------

    def _manifest(self, model: str) -> Manifest:
        """The model's own manifest (another model's file being edited is not its concern)."""
        return load_manifest(self.paths.models_dir / f"{model}.yaml")

    def _group(self, model: str, version: str | None) -> VersionGroup | None:
        route = self.pool.route(model)
        return route.version(version) if route is not None and version else None

    @staticmethod
    def _all_to(r: RolloutRecord) -> dict[str, int]:
        return {r.version: 100, **{v: 0 for v in r.stable if v != r.version}}

    def _job(self, r: RolloutRecord, start: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        """The long job of the rollout's current state, started once."""
        job = self._jobs.get((r.id, r.state))
        if job is None:
            job = self._jobs[(r.id, r.state)] = asyncio.ensure_future(start())
        return job

    def _done(self, r: RolloutRecord) -> None:
        self._jobs.pop((r.id, r.state), None)

    def _cancel_job(self, r: RolloutRecord) -> None:
        for key in [k for k in self._jobs if k[0] == r.id]:
            self._jobs.pop(key).cancel()

    async def _move(self, r: RolloutRecord, state: str, reason: str, *,
                    actor: str = CONTROLLER, **values: Any) -> RolloutRecord:
        updated = await self.repo.transition(r, actor, state=state, reason=reason,
                                             now=time.time(), **values)
        self.metrics.rollout_transitions.labels(r.model, state).inc()
        if state == "failed":
            self.metrics.rollouts_finished.labels(
                r.model, "failed", str(r.detail.get("trigger", "automatic"))).inc()
        log.log(logging.WARNING if state in ("rolling_back", "failed") else logging.INFO,
                "rollout " + state, extra={"rollout": r.id, "model": r.model,
                                           "version": r.version, "step": updated.step,
                                           "weights": updated.weights, "reason": reason,
                                           "actor": actor})
        await self._audit(r, updated, actor, reason)
        return updated

    async def _audit(self, before: RolloutRecord, after: RolloutRecord, actor: str,
                     reason: str) -> None:
        if self.trail is None:
            return
        record = {"ts": iso_timestamp(time.time()), "kind": "rollout", "rollout_id": before.id,
                  "model": before.model, "version": before.version,
                  "from_state": before.state, "to_state": after.state, "step": after.step,
                  "paused": after.paused, "weights": after.weights, "actor": actor,
                  "reason": reason}
        if before.state == "pending":
            record["created_by"] = before.created_by
        with contextlib.suppress(OSError):
            await self.trail.record(record)
