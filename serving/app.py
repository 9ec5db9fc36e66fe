"""The app factory. The only module that wires layers together; nothing imports it but the CLI
and the tests.

One request, socket to engine and back: ``server`` (uvicorn, transport deadlines) →
``routes.middleware.RequestMiddleware`` (request id, context, then the outcome: access log,
metrics, audit record) → ``routes.entry.Entry`` (operations listener, the ceiling on requests in
progress, and the inference POSTs) → ``routes.inference.forward`` (auth, intake, cost,
admission) → ``routes.relay.RelayResponse`` (the engine's answer, filtered, streamed back).
Every other path goes on to FastAPI's routes (``/v1/models``, admin, OAuth, operations).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from serving import __version__
from serving.admission.policy_store import PolicyStore
from serving.audit.trail import AuditTrail
from serving.auth.tokens import ExternalIdP, check_jwks_url
from serving.container import SessionFactory, default_session, open_services
from serving.metrics import GatewayMetrics
from serving.rollouts.recorder import RolloutRecorder
from serving.routes import admin, errors, inference, oauth, ops, rollouts
from serving.routes.entry import Entry
from serving.routes.middleware import RequestMiddleware
from serving.settings import Settings, is_allowed_engine_host
from serving.storage.manifests import load_manifests
from serving.upstream.pool import EnginePool
from serving.upstream.replicas import EjectionPolicy
from serving.upstream.tls import client_context


def create_app(settings: Settings, *, engine_host: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               session_factory: SessionFactory = default_session) -> FastAPI:
    """Build the gateway. Fails fast on unsafe settings, bad manifests or a bad policy file.

    ``transport`` replaces the health checks' and JWKS fetches' HTTP transport and
    ``session_factory`` the engines' aiohttp session: a test can put a fake upstream behind
    either."""
    engine_host = engine_host or settings.engine_host
    pepper = settings.load_pepper()
    manifests = load_manifests(settings.models_dir)
    if not is_allowed_engine_host(engine_host, settings.allow_remote_engines):
        raise ValueError(f"engine host {engine_host} is not loopback or private; set "
                         "ENCLAVE_ALLOW_REMOTE_ENGINES=true only behind a closed network")
    external = None
    if settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks_url:
        external = ExternalIdP(settings.oidc_issuer, settings.oidc_audience,
                               check_jwks_url(settings.oidc_jwks_url),
                               settings.oidc_client_claim)
    metrics = GatewayMetrics()
    pool = EnginePool(
        manifests, engine_host=engine_host,
        ejection=EjectionPolicy(settings.ejection_failures, settings.ejection_base_s,
                                settings.ejection_max_s),
        retry_ratio=settings.upstream_retry_budget,
        allow_plaintext=settings.allow_plaintext_engines,
        allow_public=settings.allow_remote_engines,
        resolve_interval_s=settings.endpoint_resolve_interval_s)  # raises ValueError
    pool.ssl = client_context(settings.engine_ca_file, settings.engine_cert_file,
                              settings.engine_key_file)
    policies = PolicyStore(settings.policies_file, set(pool.routes))  # raises PolicyError
    trail = AuditTrail(settings, metrics)
    recorder = RolloutRecorder()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings, pepper, metrics, pool, policies, trail, external,
                                 recorder, transport=transport,
                                 session_factory=session_factory) as services:
            app.state.services = services
            # Everything built so far lives as long as the process: out of the collector's
            # way, a full collection no longer walks the whole gateway (tens of milliseconds
            # with the interpreter lock held, which stalled every client while a large
            # request was scanned).
            gc.freeze()
            yield

    app = FastAPI(title="Enclave gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.include_router(inference.router)
    app.include_router(oauth.router)
    app.include_router(admin.router)
    app.include_router(rollouts.router)
    app.include_router(ops.router)
    # Added innermost first: the middleware observes everything the entry answers.
    app.add_middleware(Entry, routes=inference.ROUTES,
                       max_in_flight=settings.max_concurrent_requests,
                       ops_port=settings.ops_port)
    app.add_middleware(RequestMiddleware, metrics=metrics, access_log=settings.access_log,
                       audit=trail, observers=[recorder.observe])
    return app
