"""The routes built from the manifests, kept in step with them while the gateway runs.

``LiveRoutes`` builds a route per model (``routes.ModelRoute``: its versions, with their local
replicas and their endpoints given by address; an endpoint given by name is ``pool``'s to
resolve) and reconciles the routes in place when the manifests change (``update``, from
``storage.manifest_watch``): new models, versions and replicas join; changed ones take their
new settings and weights; what leaves takes no new request at once but keeps the requests it
has until they end. It refuses an endpoint the gateway may not use (plain HTTP off loopback; a
public address unless allowed). ``pool.EnginePool`` is one: it adds the replicas' health, the
supervisor's events, endpoint names and engine load.
"""

from __future__ import annotations

import abc
import ipaddress
import logging

from serving.domain.manifest import Deployment, Endpoint, Manifest
from serving.upstream import affinity, balancer
from serving.upstream.replicas import Replica
from serving.upstream.routes import ModelRoute, VersionGroup

log = logging.getLogger("enclave.engines")


class LiveRoutes(abc.ABC):
    """The routes of a manifest set (``routes``), changed in place by ``update``."""

    def __init__(self, manifests: list[Manifest], engine_host: str, *, retry_ratio: float,
                 allow_plaintext: bool, allow_public: bool) -> None:
        self.routes: dict[str, ModelRoute] = {}
        self._allow_plaintext = allow_plaintext
        self._allow_public = allow_public
        self._named: list[tuple[VersionGroup, Endpoint]] = []  # endpoints resolved by name
        self._engine_host = engine_host
        self._retry_ratio = retry_ratio
        self._retiring: set[VersionGroup] = set()  # no longer serving: dropped once idle
        self._check_schemes(manifests)
        for manifest in manifests:
            self.routes[manifest.name] = self._new_route(manifest)

    @abc.abstractmethod
    def _unwatch(self, replica: Replica) -> None:
        """Stop watching a replica (``pool``: its health checks and load scrapes)."""

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
