"""Every gateway's side of the rollouts under way: route by their weights, count requests.

Once a second: read the rollouts under way from the state database, put each one's weights on
its model's route (``ModelRoute.weights``; none: the manifest's split), tell the recorder
which windows to count in, write this gateway's counts, and publish the step and weights as
metrics. A gateway restarted mid-rollout routes by the same weights from its first second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from serving.metrics import GatewayMetrics
from serving.rollouts.recorder import RolloutRecorder
from serving.storage.rollouts import RolloutRecord, RolloutRepository
from serving.upstream.pool import EnginePool

log = logging.getLogger("enclave.rollouts")
HOLD_S = 60.0  # a finished rollout's weights, at most this long after it ended


class RolloutFollower:
    def __init__(self, repo: RolloutRepository, pool: EnginePool, recorder: RolloutRecorder,
                 metrics: GatewayMetrics, gateway_id: str) -> None:
        self.repo = repo
        self.pool = pool
        self.recorder = recorder
        self.metrics = metrics
        self.gateway_id = gateway_id
        self._shown: set[tuple[str, str]] = set()
        # model -> (when, weights, canary, stable) of its rollout as last seen under way
        self._ended: dict[str, tuple[float, dict[str, int], str | None,
                                     dict[str, int] | None]] = {}

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the database is away: keep the last weights, try again
                log.warning("could not follow the rollouts", exc_info=True)
            await asyncio.sleep(interval_s)

    async def sync(self) -> None:
        records = await self.repo.active()
        self.apply(records)
        now = time.time()
        pending = self.recorder.pending()
        try:
            while pending:
                rollout_id, rows = next(iter(pending.items()))
                await self.repo.put_windows(rollout_id, self.gateway_id, rows, now)
                del pending[rollout_id]
        finally:
            for rollout_id, rows in pending.items():  # not written: kept for the next round
                self.recorder.requeue(rollout_id, rows)

    def apply(self, records: list[RolloutRecord]) -> None:
        self.recorder.follow(records)
        by_model = {r.model: r for r in records}
        shown: set[tuple[str, str]] = set()
        now = time.monotonic()
        for name, route in self.pool.routes.items():
            record = by_model.get(name)
            if record is not None and record.weights:
                route.weights, route.canary, route.stable = (
                    dict(record.weights), record.version, dict(record.stable))
                self._ended[name] = (now, route.weights, route.canary, route.stable)
            elif name in self._ended:
                # The rollout ended: its last weights hold until this gateway's manifests say
                # the same (it may not have re-read them yet), at most HOLD_S.
                since, weights, canary, stable = self._ended[name]
                manifest = {v.deployment.version.name: v.deployment.weight
                            for v in route.versions if v.deployment.weight > 0}
                if manifest == {v: w for v, w in weights.items() if w > 0} or (
                        now - since > HOLD_S):
                    route.weights = route.canary = route.stable = None
                    del self._ended[name]
                else:
                    route.weights, route.canary, route.stable = weights, canary, stable
            else:
                route.weights = route.canary = route.stable = None
            for group in route.versions:
                version = group.deployment.version.name
                self.metrics.version_weight.labels(name, version).set(route.weight_of(group))
                shown.add((name, version))
            step = record.step_weight if record is not None and record.state == "canary" else 0
            self.metrics.rollout_step.labels(name).set(step or 0)
        for name, version in self._shown - shown:  # versions gone from the routes
            with contextlib.suppress(KeyError):
                self.metrics.version_weight.remove(name, version)
        self._shown = shown
