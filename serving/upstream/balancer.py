"""Picking a replica for an attempt, and the retry budget.

``pick`` first chooses the model version (the manifest's traffic split, among versions with a
replica available; a version the client pinned with ``model@version`` is the only choice), then
a replica of that version:

- with prefix affinity: the replica that served the request's longest known prefix, else the
  first on the consistent-hash ring from its first block, either only while under the load
  bound (``affinity``); past the bound, or with affinity off,
- the less loaded of two replicas drawn at random (power of two choices: near least-loaded
  without every gateway herding onto the same replica), load being outstanding requests plus
  the engine's own queue and KV-cache pressure when fresh (``Replica.score``).

The retry budget (per model) keeps retries from multiplying an outage: every first attempt
deposits ``ratio`` (0.2) of a retry, a retry withdraws one, so retries never exceed 20% of
requests (plus a reserve of ``reserve`` retries, so that the first failures of a freshly started
gateway are retried too) however many replicas fail. It holds at most ``cap`` retries.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from serving.upstream import affinity
from serving.upstream.replicas import Replica

_rand = random.Random()  # noqa: S311 (load spreading, not security)


class RetryBudget:
    def __init__(self, ratio: float = 0.2, cap: float = 10.0, reserve: float = 3.0) -> None:
        self.ratio = ratio
        self.cap = cap
        self.tokens = min(reserve, cap)

    def deposit(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def two_choices(candidates: Sequence[Replica], now: float) -> Replica:
    n = len(candidates)
    if n == 1:
        return candidates[0]
    if n == 2:
        a, b = candidates
    else:  # two distinct, uniformly (random.sample costs several times more)
        i = int(_rand.random() * n)
        j = int(_rand.random() * (n - 1))
        a, b = candidates[i], candidates[j + (j >= i)]
    sa, sb = a.score(now), b.score(now)
    if sa == sb:
        return a if _rand.random() < 0.5 else b
    return a if sa < sb else b


def weighted(groups: Sequence[tuple[int, list[Replica]]]) -> list[Replica]:
    """One version's candidates, drawn by traffic weight."""
    if len(groups) == 1:
        return groups[0][1]
    total = sum(w for w, _ in groups)
    if total <= 0:
        return groups[0][1]
    point = _rand.random() * total
    for weight, candidates in groups:
        point -= weight
        if point < 0:
            return candidates
    return groups[-1][1]


def by_affinity(candidates: Sequence[Replica], keys: Sequence[int], prefixes: affinity.PrefixMap,
                ring: affinity.Ring, now: float) -> tuple[Replica, str]:
    """The affine replica and whether it was a ``hit``, a ``miss`` (ring) or ``overloaded``
    (the affine replica was over the bound; another took it)."""
    limit = affinity.bound(sum(r.in_flight for r in candidates), len(candidates))
    known, covered = prefixes.longest(keys)
    result = "miss"
    if known is not None:
        replica = _named(candidates, known)
        if replica is not None and replica.in_flight < limit:
            prefixes.record(keys, replica.name, covered)
            return replica, "hit"
        result = "overloaded" if replica is not None else "miss"
    chosen = None
    for name in ring.walk(keys[0]):
        replica = _named(candidates, name)
        if replica is not None and replica.in_flight < limit:
            chosen = replica
            break
    if chosen is None:
        chosen = two_choices(candidates, now)
        result = "overloaded"
    prefixes.record(keys, chosen.name)
    return chosen, result


def _named(candidates: Sequence[Replica], name: str) -> Replica | None:
    for replica in candidates:
        if replica.name == name:
            return replica
    return None


def exclude(replicas: Sequence[Replica], tried: Collection[Replica], now: float
            ) -> list[Replica]:
    return [r for r in replicas if r.available(now) and r not in tried]
