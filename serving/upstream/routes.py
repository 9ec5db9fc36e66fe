"""A model's route: its versions, their replicas, and the choice of one for a request.

Each model (``ModelRoute``) has versions (``VersionGroup``, one per deployment, weighted by the
manifest's traffic split, or by a rollout's weights while one runs), each served by replicas
(``replicas.Replica``). ``pick`` chooses the replica for a request's next attempt: its
conversation's version (``sticky``), then by prefix affinity, engine load or turn
(``balancer``). ``reconcile`` builds the routes from the manifests; ``pool`` keeps their
replicas' state current.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from serving.domain.manifest import Deployment
from serving.upstream import affinity, balancer, split
from serving.upstream.replicas import Replica


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
