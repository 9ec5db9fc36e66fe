"""What routing costs per request, in-process: one decision and its release (the prefix keys of
the serialised body, the pick, the in-flight count taken and given back, the outcome recorded),
for chat bodies of 0.1, 4 and 16 KB on 1, 2 and 8 replicas, with prefix affinity and without,
against a baseline measured in the same run (the first replica taken with no decision at all).
Medians of interleaved rounds of CPU time (``time.process_time``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import orjson

from serving.domain.manifest import Manifest
from serving.upstream.affinity import Prefix
from serving.upstream.pool import EnginePool, ModelRoute
from serving.upstream.replicas import EjectionPolicy

SIZES_KB = (0.1, 4.0, 16.0)
REPLICAS = (1, 2, 8)


def _route(replicas: int, affinity: bool) -> ModelRoute:
    manifest = Manifest.model_validate({
        "name": "bench", "task": "chat", "traffic": {"v1": 100},
        "routing": {"prefix_affinity": affinity},
        "versions": [{"name": "v1", "revision": "x",
                      "source": {"kind": "path", "path": "/nonexistent"},
                      "engine": {"port": 20000, "max_model_len": 4096,
                                 "replicas": replicas}}]})
    route = EnginePool([manifest], ejection=EjectionPolicy()).routes["bench"]
    for replica in route.replicas:
        replica.healthy = True
    return route


def _body(kb: float, i: int) -> bytes:
    system = ("You answer questions about invoices and contracts. " * 400)[:int(kb * 1024)]
    return orjson.dumps({"model": "bench", "max_tokens": 16, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]})


def _per_request(fn: Callable[[bytes], None], bodies: list[bytes], seconds: float) -> float:
    """CPU µs per call of ``fn``, over ``bodies`` in turn for about ``seconds``."""
    n = 0
    start = time.process_time()
    deadline = start + seconds
    while True:
        for body in bodies:
            fn(body)
        n += len(bodies)
        now = time.process_time()
        if now >= deadline:
            return (now - start) / n * 1e6


def measure(seconds: float = 0.5, rounds: int = 5) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for kb in SIZES_KB:
        bodies = [_body(kb, i) for i in range(64)]
        first = _route(1, False).replicas[0]

        def baseline(body: bytes, first: object = first) -> None:
            replica = first
            replica.in_flight += 1  # type: ignore[attr-defined]
            replica.in_flight -= 1  # type: ignore[attr-defined]

        cases: dict[str, Callable[[bytes], None]] = {}
        for n in REPLICAS:
            for affinity in (False, True):
                route = _route(n, affinity)

                def decide(body: bytes, route: ModelRoute = route, affinity: bool = affinity
                           ) -> None:
                    replica, _ = route.pick((), None, Prefix(body) if affinity else None)
                    assert replica is not None
                    replica.in_flight -= 1
                    replica.succeeded()

                cases[f"{n} replica{'s' if n > 1 else ''}{', affinity' if affinity else ''}"] = (
                    decide)
        samples: dict[str, list[float]] = {"baseline": [], **{k: [] for k in cases}}
        for _ in range(rounds):
            samples["baseline"].append(_per_request(baseline, bodies, seconds / 4))
            for name, fn in cases.items():
                samples[name].append(_per_request(fn, bodies, seconds))
        base = statistics.median(samples["baseline"])
        for name in cases:
            cost = statistics.median(samples[name])
            rows.append({"size_kb": kb, "case": name, "us_per_request": round(cost, 2),
                         "added_us": round(cost - base, 2)})
    return rows
