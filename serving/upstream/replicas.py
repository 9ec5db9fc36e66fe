"""One engine serving a model version, as the gateway sees it: health, load, and ejection.

A replica may get a new request when it is ``available``: its health checks pass, neither an
operator (this gateway's admin API) nor its supervisor is draining it, it has not vanished
from its DNS name, and it is not ejected.

Passive ejection (outlier detection): attempts report their outcome. A connection error, or
``ejection_failures`` failures in a row (an engine 5xx, a first-byte timeout), eject the
replica for a backoff that doubles with each ejection in a row (``ejection_base_s`` up to
``ejection_max_s``). When the backoff has passed, and the replica has answered a health check
since it was ejected, exactly one request is let through as a probe (half-open): success brings
the replica back, failure ejects it again for longer. So a dead or failing engine costs a few
requests (each retried elsewhere), never a stream of errors (LiteLLM left a deployment in
rotation after 25 consecutive 500s, PR #34836; and excluded connection errors from cooldown,
#27362).

``in_flight`` is the number of requests this gateway has outstanding on the replica: taken when
the replica is picked (no await between the decision and the count, so a burst cannot herd
onto one replica, llm-d #2515) and given back in every exit path (``Upstream``, ``Relay``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from serving.domain.manifest import Deployment

log = logging.getLogger("enclave.engines")
LOAD_FRESH_S = 2.0  # engine-reported load older than this is ignored
KV_FULL = 0.9  # above this KV-cache use, a replica counts as heavily loaded
KV_FULL_PENALTY = 8.0


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    failures: int = 3
    base_s: float = 1.0
    max_s: float = 30.0


@dataclass(slots=True, eq=False)
class Replica:
    deployment: Deployment
    name: str  # demo-chat-v1/r0, or demo-chat-v1/10.0.0.7:8000 for a remote one
    base_url: str
    server_hostname: str | None = None  # the TLS name when base_url holds an address
    healthy: bool = False
    engine_state: str | None = None  # the supervisor's word, when it speaks for this replica
    draining: bool = False  # an operator, through this gateway's admin API
    engine_draining: bool = False  # the supervisor, before it stops the engine
    removed: bool = False  # gone from its endpoint's DNS answer; dropped once idle
    in_flight: int = 0
    last_error: str | None = None
    strikes: int = 0
    last_alive: float = -math.inf  # a health check answered, or an attempt got its first byte
    failures: int = 0  # in a row
    ejections: int = 0  # in a row: the next backoff doubles
    ejected_at: float = 0.0
    ejected_until: float = 0.0  # 0: not ejected
    probing: bool = False  # the one half-open request is out
    waiting: float = 0.0  # vllm:num_requests_waiting
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc
    load_at: float = -math.inf

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def available(self, now: float) -> bool:
        if not self.healthy or self.draining or self.engine_draining or self.removed:
            return False
        if not self.ejected_until:
            return True
        return now >= self.ejected_until and not self.probing and self.last_alive > self.ejected_at

    def score(self, now: float) -> float:
        """Least outstanding, refined by the engine's own queue and KV-cache use when fresh."""
        load = float(self.in_flight)
        if now - self.load_at <= LOAD_FRESH_S:
            load += self.waiting
            if self.kv_usage > KV_FULL:
                load += KV_FULL_PENALTY
        return load

    def taken(self, now: float) -> None:
        """Picked for an attempt: counted at once; the half-open probe when ejected."""
        self.in_flight += 1
        if self.ejected_until:
            self.probing = True

    def succeeded(self) -> None:
        self.failures = 0
        if self.ejected_until:
            log.info("replica back after a probe", extra={"engine": self.name})
            self.ejected_until = 0.0
            self.ejections = 0
            self.probing = False

    def failed(self, immediate: bool, policy: EjectionPolicy, probe: bool = False) -> bool:
        """An attempt failed on this replica; True when that ejected it. Attempts sent before
        an ejection that fail after it change nothing: one outage is one ejection, not one
        per request that was in flight (only a failed probe lengthens it)."""
        if self.ejected_until and not probe:
            return False
        self.failures += 1
        if probe or immediate or self.failures >= policy.failures:
            self.eject(policy)
            return True
        return False

    def eject(self, policy: EjectionPolicy) -> None:
        now = time.monotonic()
        self.ejections += 1
        backoff = min(policy.base_s * 2 ** (self.ejections - 1), policy.max_s)
        self.ejected_at = now
        self.ejected_until = now + backoff
        self.probing = False
        self.failures = 0
        log.warning("replica ejected", extra={"engine": self.name, "for_s": backoff,
                                              "ejections": self.ejections,
                                              "reason": self.last_error})

    def reinstate(self) -> None:
        """A fresh engine (its supervisor saw it become healthy): no ejection carried over."""
        self.ejected_until = 0.0
        self.ejections = 0
        self.failures = 0
        self.probing = False

    def state(self, now: float) -> str:
        if self.removed:
            return "removed"
        if self.engine_draining or self.draining:
            return "draining"
        if not self.healthy:
            return "down"
        if self.ejected_until:
            return "half_open" if now >= self.ejected_until else "ejected"
        return "ready"

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {"replica": self.name, "deployment": self.deployment.name,
                "model": self.deployment.model, "version": self.deployment.version.name,
                "url": self.base_url, "state": self.state(now), "healthy": self.healthy,
                "draining": self.draining or self.engine_draining,
                "engine_state": self.engine_state, "in_flight": self.in_flight,
                "ejected_for_s": round(max(self.ejected_until - now, 0.0), 3)
                if self.ejected_until else None,
                "consecutive_failures": self.failures, "last_error": self.last_error,
                "engine_waiting": self.waiting if now - self.load_at <= LOAD_FRESH_S else None,
                "engine_kv_cache_usage": self.kv_usage
                if now - self.load_at <= LOAD_FRESH_S else None}
