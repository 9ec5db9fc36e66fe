"""Which engine serves a model, and whether it is up.

Built from the manifests: one engine per deployment (model version). A background task polls
each engine's ``/health``; a request that fails to connect marks its engine down at once, so
traffic never keeps flowing to a dead engine, and a healthy poll brings it back. Choosing an
engine for a model is a weighted pick among its healthy versions (the manifest's traffic split).

An operator can drain an engine (before patching its host): it gets no new requests while the
ones in flight finish; undraining puts it back. Draining is per gateway process, in memory: the
patch script drains the engine on every gateway it is given.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

import httpx

from serving.domain.manifest import Deployment, Manifest

log = logging.getLogger("enclave.engines")
HEALTH_TIMEOUT_S = 5.0
HEALTH_STRIKES = 3


@dataclass(slots=True)
class EngineState:
    deployment: Deployment
    base_url: str
    healthy: bool = False
    last_error: str | None = None
    strikes: int = 0
    in_flight: int = 0
    draining: bool = False

    @property
    def name(self) -> str:
        return self.deployment.name

    def status(self) -> dict[str, object]:
        return {"deployment": self.name, "model": self.deployment.model,
                "version": self.deployment.version.name, "url": self.base_url,
                "healthy": self.healthy, "draining": self.draining,
                "in_flight": self.in_flight, "last_error": self.last_error}


@dataclass(slots=True)
class ModelRoute:
    name: str
    task: str
    max_model_len: int
    engines: list[EngineState] = field(default_factory=list)

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> EngineState | None:
        candidates = [e for e in self.engines if e.healthy and not e.draining
                      and e.deployment.weight > 0 and e.name not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        weights = [e.deployment.weight for e in candidates]
        return random.choices(candidates, weights=weights, k=1)[0]  # noqa: S311 (not crypto)


class EnginePool:
    def __init__(self, manifests: list[Manifest], engine_host: str = "127.0.0.1") -> None:
        self.routes: dict[str, ModelRoute] = {}
        self.engines: list[EngineState] = []
        for manifest in manifests:
            deps = manifest.deployments()
            route = ModelRoute(
                name=manifest.name, task=manifest.task,
                max_model_len=max(d.version.engine.max_model_len for d in deps),
            )
            for dep in deps:
                state = EngineState(dep, f"http://{engine_host}:{dep.port}")
                route.engines.append(state)
                self.engines.append(state)
            self.routes[manifest.name] = route

    def route(self, model: str) -> ModelRoute | None:
        return self.routes.get(model)

    def engine(self, deployment: str) -> EngineState | None:
        return next((e for e in self.engines if e.name == deployment), None)

    def set_draining(self, engine: EngineState, draining: bool) -> None:
        if engine.draining != draining:
            log.info("engine drained" if draining else "engine undrained",
                     extra={"engine": engine.name, "in_flight": engine.in_flight})
        engine.draining = draining

    def mark_down(self, engine: EngineState, reason: str) -> None:
        if engine.healthy:
            log.warning("engine marked down", extra={"engine": engine.name, "reason": reason})
        engine.healthy = False
        engine.last_error = reason

    async def check(self, client: httpx.AsyncClient, engine: EngineState) -> None:
        """Poll /health. A refused connection means the engine is gone: down at once. A slow or
        failing answer counts as one strike; a busy CPU engine can answer /health late, and
        taking it out of service for that would turn load into errors."""
        try:
            resp = await client.get(f"{engine.base_url}/health", timeout=HEALTH_TIMEOUT_S)
            ok = resp.status_code == 200
            reason = None if ok else f"/health answered {resp.status_code}"
            gone = False
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            ok, reason, gone = False, type(exc).__name__, True
        except httpx.HTTPError as exc:
            ok, reason, gone = False, type(exc).__name__, False
        if ok:
            engine.strikes = 0
            if not engine.healthy:
                log.info("engine up", extra={"engine": engine.name})
            engine.healthy, engine.last_error = True, None
            return
        engine.strikes += 1
        engine.last_error = reason
        if engine.healthy and (gone or engine.strikes >= HEALTH_STRIKES):
            log.warning("engine down", extra={"engine": engine.name, "reason": reason})
            engine.healthy = False

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, e) for e in self.engines))

    async def watch(self, client: httpx.AsyncClient, interval_s: float) -> None:
        while True:
            await self.check_all(client)
            await asyncio.sleep(interval_s)
