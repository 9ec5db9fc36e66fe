"""Which replicas serve a model, and what state each is in.

Built from the manifests (``reconcile``): each model (``routes.ModelRoute``) has versions
(``VersionGroup``, one per deployment, weighted by the manifest's traffic split), each served
by replicas (``Replica``): the local ones the supervisor runs (``engine_host:port+i``) and
``endpoints`` elsewhere (an address is one replica; a name is re-resolved every few seconds,
each private address a replica, vanished ones dropped once their requests have ended).

Three sources keep the state current, none waiting on another:

- each replica's ``/health``, polled on its own (a hung engine delays no other's check); a
  refused connection marks it down at once, slow or failing answers after three strikes;
- the supervisor's control socket (``engines.control``), when this gateway can reach it: a
  replica's exit, start, health and draining are known the moment the supervisor sees them;
- each attempt's outcome (``Upstream``): passive ejection (``replicas``).

Engine load (``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``) is scraped from each
replica's ``/metrics`` at most every second for models that use it.

An operator can drain a deployment or one replica on this gateway (the admin API); the
supervisor drains a replica for every gateway (``enclave engines drain``).

The manifests change while it runs (``update``, from ``storage.manifest_watch``; an
``EnginePool`` is a ``reconcile.LiveRoutes``): routes, versions and replicas are reconciled in
place, and what leaves takes no new request at once but keeps the requests it has until they
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from serving.domain.manifest import Endpoint, Manifest
from serving.engines import control, vllm_metrics
from serving.upstream.reconcile import LiveRoutes, _private, _url_host
from serving.upstream.replicas import EjectionPolicy, Replica
from serving.upstream.routes import ModelRoute as ModelRoute  # re-exported
from serving.upstream.routes import VersionGroup as VersionGroup  # re-exported

log = logging.getLogger("enclave.engines")
HEALTH_TIMEOUT_S = 5.0
HEALTH_STRIKES = 3
SCRAPE_TIMEOUT_S = 1.0
_WAITING, _KV = "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
_DOWN_STATES = frozenset({"starting", "backoff", "exited", "held", "stopped"})


class EnginePool(LiveRoutes):
    """Every model's replicas and their state; the routes follow the manifests (``update``:
    ``reconcile.LiveRoutes``)."""

    def __init__(self, manifests: list[Manifest], engine_host: str = "127.0.0.1", *,
                 ejection: EjectionPolicy | None = None, retry_ratio: float = 0.2,
                 allow_plaintext: bool = False, allow_public: bool = False,
                 resolve_interval_s: float = 5.0) -> None:
        self.ejection = ejection or EjectionPolicy()
        self.ssl: ssl.SSLContext | None = None  # for https endpoints (``tls.client_context``)
        self._resolve_interval_s = resolve_interval_s
        self._checks: dict[Replica, asyncio.Task[None]] = {}
        self._scrapes: dict[Replica, asyncio.Task[None]] = {}
        super().__init__(manifests, engine_host, retry_ratio=retry_ratio,
                         allow_plaintext=allow_plaintext, allow_public=allow_public)

    @property
    def engines(self) -> list[Replica]:
        return [r for route in self.routes.values() for r in route.replicas]

    def route(self, model: str) -> ModelRoute | None:
        return self.routes.get(model)

    def deployment(self, name: str) -> VersionGroup | None:
        return next((v for route in self.routes.values() for v in route.versions
                     if v.deployment.name == name), None)

    def replica(self, name: str) -> Replica | None:
        """The replica of that name; the live one when a removed one (its old URL, still
        finishing requests) has the same name."""
        found = [r for r in self.engines if r.name == name]
        return next((r for r in found if not r.removed), found[0] if found else None)

    def set_draining(self, replica: Replica, draining: bool) -> None:
        if replica.draining != draining:
            log.info("engine drained" if draining else "engine undrained",
                     extra={"engine": replica.name, "in_flight": replica.in_flight})
        replica.draining = draining

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("engine marked down", extra={"engine": replica.name, "reason": reason})
        replica.healthy = False
        replica.last_error = reason

    # -- health ---------------------------------------------------------------------------

    async def check(self, client: httpx.AsyncClient, replica: Replica) -> None:
        """Poll /health. A refused connection means the engine is gone: down at once. A slow or
        failing answer counts as one strike; a busy CPU engine can answer /health late, and
        taking it out of service for that would turn load into errors."""
        try:
            resp = await client.get(f"{replica.base_url}/health", timeout=HEALTH_TIMEOUT_S,
                                    extensions=_sni(replica))
            ok = resp.status_code == 200
            reason = None if ok else f"/health answered {resp.status_code}"
            gone = False
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            ok, reason, gone = False, type(exc).__name__, True
        except httpx.HTTPError as exc:
            ok, reason, gone = False, type(exc).__name__, False
        if ok:
            replica.strikes = 0
            replica.last_alive = time.monotonic()
            if not replica.healthy:
                log.info("engine up", extra={"engine": replica.name})
            replica.healthy = True
            if not replica.ejected_until:
                replica.last_error = None
            return
        replica.strikes += 1
        replica.last_error = reason
        if replica.healthy and (gone or replica.strikes >= HEALTH_STRIKES):
            log.warning("engine down", extra={"engine": replica.name, "reason": reason})
            replica.healthy = False

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await self.resolve_all()
        await asyncio.gather(*(self.check(client, r) for r in self.engines))

    async def watch(self, client: httpx.AsyncClient, interval_s: float) -> None:
        """Each replica's health on its own schedule, and its load where its model uses it."""
        while True:
            self._drop_removed()
            for route in self.routes.values():
                for replica in route.replicas:
                    _keep_running(self._checks, replica, partial(self.check, client, replica))
                    if route.engine_load:
                        _keep_running(self._scrapes, replica,
                                      partial(self.scrape, client, replica))
            await asyncio.sleep(interval_s)

    async def scrape(self, client: httpx.AsyncClient, replica: Replica) -> None:
        if not replica.healthy:
            return
        try:
            resp = await client.get(f"{replica.base_url}/metrics", timeout=SCRAPE_TIMEOUT_S,
                                    extensions=_sni(replica))
        except httpx.HTTPError:
            return
        if resp.status_code != 200:
            return
        waiting, kv = parse_load(resp.content)
        if waiting is not None:
            replica.waiting = waiting
            replica.kv_usage = kv or 0.0
            replica.load_at = time.monotonic()

    # -- the supervisor ---------------------------------------------------------------------

    async def follow_supervisor(self, path: Path, retry_s: float = 1.0) -> None:
        """Apply the supervisor's replica events as they happen; reconnect when it restarts."""
        while True:
            try:
                async for event in control.watch(path):
                    if event.get("event") == "snapshot":
                        for status in event.get("replicas", []):
                            self.apply(status)
                    elif event.get("event") == "replica":
                        self.apply(event)
            except (OSError, ValueError):
                pass
            # Health checks alone until it is back; a drain it announced stands until its
            # next snapshot says otherwise.
            for replica in self.engines:
                if replica.engine_state is not None:
                    replica.engine_state = "unknown"
            await asyncio.sleep(retry_s)

    def apply(self, status: dict[str, Any]) -> None:
        replica = self.replica(str(status.get("replica")))
        if replica is None:
            return
        state = str(status.get("state"))
        before = replica.engine_state
        replica.engine_state = state
        if state == "healthy":
            replica.engine_draining = False
            if before in _DOWN_STATES:  # a fresh engine: nothing of the old one's record
                replica.reinstate()
                replica.healthy = True
                replica.last_alive = time.monotonic()
                replica.last_error = None
        elif state == "draining":
            replica.engine_draining = True
        elif state in _DOWN_STATES:
            replica.engine_draining = False
            if replica.healthy:
                log.warning("engine down", extra={"engine": replica.name,
                                                  "reason": f"supervisor: {state}"})
            replica.healthy = False
            replica.last_error = f"supervisor: {state}"

    # -- endpoints by name -----------------------------------------------------------------

    async def resolve_all(self) -> None:
        for group, endpoint in self._named:
            await self.resolve(group, endpoint)

    async def keep_resolved(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_interval_s)
            await self.resolve_all()

    async def resolve(self, group: VersionGroup, endpoint: Endpoint) -> None:
        """Every address the name has now is a replica; one it no longer has is dropped once
        its requests have ended (vLLM production-stack kept routing to deleted pods, #420)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port,
                                           type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.warning("endpoint name did not resolve; keeping its last addresses",
                        extra={"endpoint": endpoint.url, "error": str(exc)})
            return
        addresses = []
        for info in infos:
            address = str(info[4][0]).split("%")[0]
            if not self._allow_public and not _private(address):
                log.warning("endpoint address refused: not private",
                            extra={"endpoint": endpoint.url, "address": address})
                continue
            if address not in addresses:
                addresses.append(address)
        prefix = f"{group.deployment.name}/"
        suffix = f":{endpoint.port}"
        mine = {r.name: r for r in group.replicas if r.server_hostname == endpoint.host
                and r.name.startswith(prefix) and r.name.endswith(suffix)
                and r.base_url.startswith(f"{endpoint.scheme}://")}
        wanted = {f"{prefix}{_url_host(a)}:{endpoint.port}": a for a in addresses}
        for name, replica in mine.items():
            if name not in wanted and not replica.removed:
                log.info("replica left its endpoint's name", extra={"engine": name})
                replica.removed = True
        for name, address in wanted.items():
            if name in mine:
                mine[name].removed = False
            else:
                group.replicas.append(self._remote(group.deployment, endpoint, address))
                group.ring = None
                log.info("replica found by name", extra={"engine": name})

    def _drop_removed(self) -> None:
        for route in self.routes.values():
            for group in route.versions:
                if any(r.removed and r.in_flight == 0 for r in group.replicas):
                    gone = [r for r in group.replicas if r.removed and r.in_flight == 0]
                    group.replicas = [r for r in group.replicas if r not in gone]
                    group.ring = None
                    for replica in gone:
                        self._unwatch(replica)
            done = [g for g in route.versions if g in self._retiring and not g.replicas]
            if done:
                route.versions = [g for g in route.versions if g not in done]
                self._retiring.difference_update(done)
                for group in done:
                    log.info("version removed", extra={"deployment": group.deployment.name})

    def _unwatch(self, replica: Replica) -> None:
        for tasks in (self._checks, self._scrapes):
            task = tasks.pop(replica, None)
            if task is not None:
                task.cancel()


def parse_load(text: bytes) -> tuple[float | None, float | None]:
    """The sum of vLLM's waiting requests and the highest KV-cache use over its samples."""
    found = vllm_metrics.samples(text, (_WAITING, _KV))
    waiting, kv = found[_WAITING], found[_KV]
    return (sum(waiting) if waiting else None), (max(kv) if kv else None)


def _keep_running(tasks: dict[Replica, asyncio.Task[None]], replica: Replica,
                  start: Callable[[], Awaitable[None]]) -> None:
    task = tasks.get(replica)
    if task is None or task.done():
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        tasks[replica] = asyncio.ensure_future(start())


def _sni(replica: Replica) -> dict[str, str]:
    return {"sni_hostname": replica.server_hostname} if replica.server_hostname else {}
