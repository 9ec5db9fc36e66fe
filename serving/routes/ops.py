"""Operational endpoints: liveness, readiness and Prometheus metrics. No authentication:
they expose no request content, and ``/metrics`` carries only bounded labels.

With an operations listener configured (``ENCLAVE_OPS_PORT``), ``/metrics`` and the detail of
``/readyz`` (model, engine and client names) are served there only: the API port answers
``/readyz`` with its status alone, and the request middleware answers ``/metrics`` there with
404. ``/healthz`` is served on both.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.routes.deps import Pool, services
from serving.routes.entry import on_ops_listener
from serving.routes.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request, pool: Pool) -> JSONResponse:
    now = time.monotonic()
    engines = {e.name: {"model": e.deployment.model, "healthy": e.healthy,
                        "state": e.state(now),
                        **({"draining": True} if e.draining or e.engine_draining else {}),
                        **({"error": e.last_error} if e.last_error else {})}
               for e in pool.engines}
    models = {name: route.ready() for name, route in pool.routes.items()}
    audit = services(request.scope).audit
    ready = bool(models) and all(models.values()) and audit.healthy
    status = 200 if ready else 503
    if not on_ops_listener(request.scope, services(request.scope).settings.ops_port):
        return JSONResponse({"status": "ready" if ready else "not_ready"}, status_code=status)
    return JSONResponse({"status": "ready" if ready else "not_ready", "models": models,
                         "engines": engines,
                         "audit": "ok" if audit.healthy else "cannot_write"},
                        status_code=status)


@router.get("/metrics")
async def metrics(request: Request, pool: Pool) -> Response:
    m = services(request.scope).metrics
    m.audit_queue.set(services(request.scope).audit.queued)
    now = time.monotonic()
    for route in pool.routes.values():
        routable = 0
        for group in route.versions:
            dep = group.deployment
            m.engine_up.labels(dep.model, dep.name).set(
                1 if any(r.healthy for r in group.replicas) else 0)
            m.engine_draining.labels(dep.model, dep.name).set(
                1 if group.replicas and all(r.draining or r.engine_draining
                                            for r in group.replicas) else 0)
            for r in group.replicas:
                labels = (dep.model, dep.name, r.name)
                available = r.available(now)
                routable += available
                m.replica_routable.labels(*labels).set(1 if available else 0)
                m.replica_ejected.labels(*labels).set(1 if r.ejected_until else 0)
                m.replica_draining.labels(*labels).set(
                    1 if r.draining or r.engine_draining else 0)
                m.replica_in_flight.labels(*labels).set(r.in_flight)
        m.model_replicas.labels(route.name).set(len(route.replicas))
        m.model_replicas_routable.labels(route.name).set(routable)
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)
