"""Which replicas serve a model, and what state each is in.

Built from the manifests: each model (``ModelRoute``) has versions (``VersionGroup``, one per
deployment, weighted by the manifest's traffic split), each served by replicas (``Replica``):
the local ones the supervisor runs (``engine_host:port+i``) and ``endpoints`` elsewhere (an
address is one replica; a name is re-resolved every few seconds, each private address a
replica, vanished ones dropped once their requests have ended).

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

The manifests change while it runs (``update``, from ``storage.manifest_watch``): routes,
versions and replicas are reconciled in place, and what leaves takes no new request at once
but keeps the requests it has until they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from serving.domain.manifest import Deployment, Endpoint, Manifest
from serving.engines import control, vllm_metrics
from serving.upstream import affinity, balancer, split
from serving.upstream.replicas import EjectionPolicy, Replica

log = logging.getLogger("enclave.engines")
HEALTH_TIMEOUT_S = 5.0
HEALTH_STRIKES = 3
SCRAPE_TIMEOUT_S = 1.0
_WAITING, _KV = "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
_DOWN_STATES = frozenset({"starting", "backoff", "exited", "held", "stopped"})


@dataclass(slots=True, eq=False)
class VersionGroup:
    deployment: Deployment
    replicas: list[Replica] = field(default_factory=list)
    ring: affinity.Ring | None = None

    def ring_of(self) -> affinity.Ring:
        """The ring over the replicas (rebuilt after the pool changes them: ``ring = None``)."""
        if self.ring is None:
            self.ring = affinity.Ring([r.name for r in self.replicas])
        return self.ring


@dataclass(slots=True, eq=False)
class ModelRoute:
    name: str
    task: str
    max_model_len: int
    versions: list[VersionGroup] = field(default_factory=list)
    prefixes: affinity.PrefixMap | None = None  # prefix affinity on
    engine_load: bool = True
    budget: balancer.RetryBudget = field(default_factory=balancer.RetryBudget)
    round_robin: bool = False  # the manifest's balance: round_robin (no load, no affinity)
    # A rollout's weights (version name -> percent), in place of the manifest's traffic split
    # while one runs; every gateway reads the same ones from the state database.
    weights: dict[str, int] | None = None
    canary: str | None = None  # the rollout's new version
    stable: dict[str, int] | None = None  # the other versions' weights at the rollout's start
    _turn: int = 0

    def weight_of(self, group: VersionGroup) -> int:
        if self.weights is not None:
            return self.weights.get(group.deployment.version.name, 0)
        return group.deployment.weight

    def sticky(self, bucket: int) -> VersionGroup | None:
        """The version a conversation (its hash: ``split.bucket``) belongs to. The hash has two
        independent parts: the low digits (the bucket) decide between a rollout's canary and
        the rest (the canary takes the lowest buckets, as many as its weight); the next digits
        choose among the other versions by their weights (during a rollout: their weights at
        its start). So a rollout moves conversations from the stable versions to the canary
        as its weight grows, never between stable versions, and a rollback puts each back
        where it was."""
        low, high = bucket % split.BUCKETS, (bucket // split.BUCKETS) % split.BUCKETS
        weighted = [(v, self.weight_of(v)) for v in self.versions if self.weight_of(v) > 0]
        canary = next((v for v in self.versions if v.deployment.version.name == self.canary),
                      None) if self.canary is not None else None
        if canary is not None:
            if low < self.weight_of(canary) * split.BUCKETS // 100:
                return canary
            stable = self.stable or {}
            weighted = [(v, stable.get(v.deployment.version.name, 0)) for v in self.versions
                        if v is not canary]
        weighted = [(v, w) for v, w in weighted if w > 0]
        total = sum(w for _, w in weighted)
        point, upto = high * total, 0
        for v, w in weighted:
            upto += w * split.BUCKETS
            if point < upto:
                return v
        return None

    def split(self) -> bool:
        """More than one version takes traffic: requests are assigned to versions by their
        conversation's bucket (``upstream.split``)."""
        return sum(1 for v in self.versions if self.weight_of(v) > 0) > 1

    @property
    def replicas(self) -> list[Replica]:
        return [r for v in self.versions for r in v.replicas]

    def version(self, name: str) -> VersionGroup | None:
        return next((v for v in self.versions if v.deployment.version.name == name), None)

    def ready(self) -> bool:
        """A replica of a version with traffic is up and not draining (a passive ejection is
        a replica's passing state, not the model's readiness)."""
        return any(r.healthy and not (r.draining or r.engine_draining or r.removed)
                   for v in self.versions if self.weight_of(v) > 0 for r in v.replicas)

    def pick(self, tried: Collection[Replica], pinned: VersionGroup | None,
             prefix: affinity.Prefix | None, bucket: int | None = None
             ) -> tuple[Replica | None, str | None]:
        """A replica for the next attempt (never one in ``tried``), counted as taken; with the
        affinity result (hit, miss, overloaded) when affinity decided. None: none available.
        ``bucket`` (the request's conversation hash, ``split.bucket``): which version it
        belongs to when several take traffic (``sticky``), the same one for the whole
        conversation; when that version has no replica left to try, another version takes
        the request."""
        now = time.monotonic()
        if pinned is not None:
            group: VersionGroup | None = pinned
            candidates = balancer.exclude(pinned.replicas, tried, now)
        else:
            groups = []
            for v in self.versions:
                weight = self.weight_of(v)
                if weight > 0:
                    found = balancer.exclude(v.replicas, tried, now)
                    if found:
                        groups.append((weight, found, v))
            if not groups and self.weights is not None:
                # A rollout's weights leave no version available (its canary at 100 % is
                # down): a version it took the traffic from serves until it is retired.
                groups = [(1, found, v) for v in self.versions
                          if v.deployment.version.name in self.weights
                          and (found := balancer.exclude(v.replicas, tried, now))]
            if not groups:
                return None, None
            sticky = self.sticky(bucket) if bucket is not None else None
            mine = next((g for g in groups if g[2] is sticky), None)
            if mine is not None:
                _, candidates, group = mine
            elif len(groups) == 1:
                _, candidates, group = groups[0]
            else:
                candidates = balancer.weighted([(w, c) for w, c, _ in groups])
                group = next(g for _, c, g in groups if c is candidates)
        if not candidates:
            return None, None
        result = None
        if self.round_robin:
            self._turn += 1
            replica = candidates[self._turn % len(candidates)]
        elif prefix is not None and self.prefixes is not None and len(candidates) > 1:
            assert group is not None
            replica, result = balancer.by_affinity(candidates, prefix.keys, self.prefixes,
                                                   group.ring_of(), now)
        else:  # one replica to choose from: its prefixes are not recorded (nothing to decide)
            replica = balancer.two_choices(candidates, now)
        replica.taken(now)
        return replica, result


class EnginePool:
    def __init__(self, manifests: list[Manifest], engine_host: str = "127.0.0.1", *,
                 ejection: EjectionPolicy | None = None, retry_ratio: float = 0.2,
                 allow_plaintext: bool = False, allow_public: bool = False,
                 resolve_interval_s: float = 5.0) -> None:
        self.routes: dict[str, ModelRoute] = {}
        self.ejection = ejection or EjectionPolicy()
        self.ssl: ssl.SSLContext | None = None  # for https endpoints (``tls.client_context``)
        self._allow_plaintext = allow_plaintext
        self._allow_public = allow_public
        self._resolve_interval_s = resolve_interval_s
        self._named: list[tuple[VersionGroup, Endpoint]] = []  # endpoints resolved by name
        self._checks: dict[Replica, asyncio.Task[None]] = {}
        self._scrapes: dict[Replica, asyncio.Task[None]] = {}
        self._engine_host = engine_host
        self._retry_ratio = retry_ratio
        self._retiring: set[VersionGroup] = set()  # no longer serving: dropped once idle
        self._check_schemes(manifests)
        for manifest in manifests:
            self.routes[manifest.name] = self._new_route(manifest)

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

    # -- live manifests ---------------------------------------------------------------------

    def update(self, manifests: list[Manifest]) -> None:
        """Reconcile the routes with a new manifest set, in place. New models, versions and
        replicas join down (until a health check or the supervisor says otherwise); changed
        ones take their new settings and weights; a replica gone (or moved to another URL)
        and every replica of a version no longer serving take no new request at once and are
        dropped once their requests have ended; a model whose manifest is gone is removed.
        A set with an endpoint this pool refuses (plain HTTP, a public address) is refused as
        a whole: ValueError, nothing changed."""
        self._check_schemes(manifests)
        wanted = {m.name for m in manifests}
        for name in [n for n in self.routes if n not in wanted]:
            self._forget(self.routes.pop(name))
            log.info("model removed", extra={"model": name})
        for manifest in manifests:
            route = self.routes.get(manifest.name)
            if route is None:
                route = self.routes[manifest.name] = self._new_route(manifest)
                log.info("model added", extra={"model": manifest.name,
                                               "replicas": [r.name for r in route.replicas]})
            else:
                self._update_route(route, manifest)

    def _new_route(self, manifest: Manifest) -> ModelRoute:
        deps = manifest.deployments()
        route = ModelRoute(
            name=manifest.name, task=manifest.task,
            max_model_len=max(d.version.engine.max_model_len for d in deps),
            prefixes=affinity.PrefixMap() if manifest.prefix_affinity else None,
            engine_load=manifest.routing.engine_load,
            round_robin=manifest.routing.balance == "round_robin",
            budget=balancer.RetryBudget(self._retry_ratio))
        route.versions = [self._new_group(dep) for dep in deps]
        return route

    def _new_group(self, dep: Deployment) -> VersionGroup:
        group = VersionGroup(dep, self._fixed(dep))
        self._named.extend((group, e) for e in dep.version.engine.endpoints
                           if not _is_address(e.host))
        return group

    def _fixed(self, dep: Deployment) -> list[Replica]:
        """The replicas a deployment names outright: its local ones and its endpoints given
        by address (those given by name are resolved: ``resolve``)."""
        host = _url_host(self._engine_host)
        replicas = [Replica(dep, dep.replica_name(index), f"http://{host}:{port}")
                    for index, port, _ in dep.version.engine.local_replicas()]
        replicas.extend(self._remote(dep, e, e.host) for e in dep.version.engine.endpoints
                        if _is_address(e.host))
        return replicas

    def _update_route(self, route: ModelRoute, manifest: Manifest) -> None:
        deps = manifest.deployments()
        route.task = manifest.task
        route.max_model_len = max(d.version.engine.max_model_len for d in deps)
        if manifest.prefix_affinity != (route.prefixes is not None):
            route.prefixes = affinity.PrefixMap() if manifest.prefix_affinity else None
        route.engine_load = manifest.routing.engine_load
        route.round_robin = manifest.routing.balance == "round_robin"
        serving: list[VersionGroup] = []
        for dep in deps:
            group = next((g for g in route.versions
                          if g.deployment.version.name == dep.version.name), None)
            if group is None:
                group = self._new_group(dep)
                log.info("version added", extra={"deployment": dep.name,
                                                 "replicas": [r.name for r in group.replicas]})
            else:
                if group in self._retiring:
                    self._retiring.discard(group)
                    log.info("version serving again", extra={"deployment": dep.name})
                self._update_group(group, dep)
            serving.append(group)
        every = {d.version.name: d for d in manifest.all_deployments()}
        for group in route.versions:
            if group not in serving and group not in self._retiring:
                self._retire(group, every.get(group.deployment.version.name))
        # The manifest's order (a request's bucket falls in the versions in this order), the
        # versions on their way out last.
        route.versions = serving + [g for g in route.versions if g not in serving]

    def _update_group(self, group: VersionGroup, dep: Deployment) -> None:
        if dep != group.deployment:  # weights, engine settings, metadata
            group.deployment = dep
            for replica in group.replicas:
                replica.deployment = dep
        fresh = {(r.name, r.base_url): r for r in self._fixed(dep)}
        named = [e for e in dep.version.engine.endpoints if not _is_address(e.host)]
        changed = False
        for replica in group.replicas:
            if replica.server_hostname is None:  # local, or an endpoint given by address
                if fresh.pop((replica.name, replica.base_url), None) is not None:
                    if replica.removed:
                        replica.removed = False
                        changed = True
                    continue
            elif any(replica.server_hostname == e.host and replica.name.endswith(f":{e.port}")
                     and replica.base_url.startswith(f"{e.scheme}://") for e in named):
                continue  # its name's addresses are ``resolve``'s to keep
            if not replica.removed:
                replica.removed = True
                changed = True
                log.info("replica removed", extra={"engine": replica.name,
                                                   "in_flight": replica.in_flight})
        for replica in fresh.values():
            group.replicas.append(replica)
            changed = True
            log.info("replica added", extra={"engine": replica.name, "url": replica.base_url})
        if changed:
            group.ring = None
        self._named = [(g, e) for g, e in self._named if g is not group]
        self._named.extend((group, e) for e in named)

    def _retire(self, group: VersionGroup, dep: Deployment | None) -> None:
        """A version no longer serving (retired, staged, or gone from its manifest): no new
        request from now on; its group goes once its requests have ended."""
        dep = dep if dep is not None else group.deployment.model_copy(update={"weight": 0})
        group.deployment = dep
        for replica in group.replicas:
            replica.deployment = dep
            replica.removed = True
        self._named = [(g, e) for g, e in self._named if g is not group]
        self._retiring.add(group)
        log.info("version no longer serving", extra={
            "deployment": dep.name, "state": dep.version.state,
            "in_flight": sum(r.in_flight for r in group.replicas)})

    def _forget(self, route: ModelRoute) -> None:
        """A model gone from the manifests: requests in flight keep their replicas; nothing
        watches them any more."""
        for group in route.versions:
            self._retiring.discard(group)
            for replica in group.replicas:
                replica.removed = True
                self._unwatch(replica)
        self._named = [(g, e) for g, e in self._named if g not in route.versions]

    def _check_schemes(self, manifests: list[Manifest]) -> None:
        for manifest in manifests:
            for dep in manifest.deployments():
                for endpoint in dep.version.engine.endpoints:
                    self._check_scheme(endpoint)

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

    def _remote(self, dep: Deployment, endpoint: Endpoint, address: str) -> Replica:
        named = not _is_address(endpoint.host)
        return Replica(dep, f"{dep.name}/{_url_host(address)}:{endpoint.port}",
                       f"{endpoint.scheme}://{_url_host(address)}:{endpoint.port}",
                       server_hostname=endpoint.host if named else None)

    def _check_scheme(self, endpoint: Endpoint) -> None:
        if endpoint.scheme == "http" and not self._allow_plaintext and not _loopback(
                endpoint.host):
            raise ValueError(
                f"engine endpoint {endpoint.url} is plain HTTP: prompts would cross the "
                "network in clear. Use https:// (ENCLAVE_ENGINE_CA_FILE names the private CA), "
                "or set ENCLAVE_ALLOW_PLAINTEXT_ENGINES=true inside a closed network")
        if _is_address(endpoint.host) and not self._allow_public and not _private(
                endpoint.host):
            raise ValueError(f"engine endpoint {endpoint.url} is not a private address; set "
                             "ENCLAVE_ALLOW_REMOTE_ENGINES=true only behind a closed network")


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


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_private or ip.is_loopback


def _loopback(host: str) -> bool:
    return host == "localhost" or (_is_address(host) and ipaddress.ip_address(host).is_loopback)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
