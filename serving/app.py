"""The app factory. The only module that wires layers together; nothing imports it but the CLI
and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from serving import __version__
from serving.metrics import GatewayMetrics
from serving.routes import admin, handlers, inference, oauth, ops
from serving.routes.middleware import RequestMiddleware
from serving.services.admission import Gatekeeper
from serving.services.audit import AuditTrail
from serving.services.auth import KeyService
from serving.services.budgets import BudgetLedger
from serving.services.clients import ClientService
from serving.services.engines import EnginePool
from serving.services.offload import Offload
from serving.services.policy import PolicyStore
from serving.services.protection import Protector
from serving.services.proxy import Upstream, new_session
from serving.services.ratelimits import RateLimiter
from serving.services.tokens import ExternalIdP, TokenIssuer, TokenVerifier, check_jwks_url
from serving.settings import Settings, is_allowed_engine_host
from serving.storage import migrate
from serving.storage.clients import ClientRepository
from serving.storage.db import create_engine
from serving.storage.keys import KeyRepository
from serving.storage.ledger import LedgerRepository
from serving.storage.manifests import load_manifests
from serving.storage.signing import SigningKeyRepository

log = logging.getLogger("enclave.gateway")


def create_app(settings: Settings, *, engine_host: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build the gateway. Fails fast on unsafe settings, bad manifests or a bad policy file."""
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
    pool = EnginePool(manifests, engine_host=engine_host)
    policies = PolicyStore(settings.policies_file, set(pool.routes))  # raises PolicyError
    trail = AuditTrail(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trail.start()  # refuses to start when the trail cannot be opened
        db = create_engine(settings.resolved_database_url)
        if settings.auto_migrate:
            before, now = await migrate.upgrade(db)
            if before != now:
                log.info("state database migrated", extra={"from_revision": before,
                                                           "to_revision": now})
        # Health checks and JWKS fetches go through httpx; proxied requests through aiohttp.
        client = httpx.AsyncClient(timeout=5.0, transport=transport, trust_env=False,
                                   follow_redirects=False)
        session = new_session(settings.upstream_connect_timeout_s,
                              settings.upstream_read_timeout_s, settings.upstream_keepalive_s)
        # A concurrency slot in Redis outlives any request; one left by a dead gateway expires.
        limiter = RateLimiter(settings.redis_url,
                              lease_ttl_s=max(600.0, 5 * settings.upstream_read_timeout_s))
        ledger = BudgetLedger(LedgerRepository(db), settings.reservation_ttl_s)
        ledger.start()
        issuer = TokenIssuer(SigningKeyRepository(db), pepper, settings.oauth_issuer,
                             settings.oauth_audience, settings.oauth_token_ttl_s)
        await issuer.start()
        keys = KeyService(KeyRepository(db), pepper, settings.key_cache_ttl_s,
                          settings.unknown_key_lookups_per_minute)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.pool = pool
        app.state.policies = policies
        app.state.keys = keys
        app.state.clients = ClientService(ClientRepository(db), policies,
                                          settings.key_cache_ttl_s)
        app.state.ledger = ledger
        app.state.token_issuer = issuer
        app.state.tokens = TokenVerifier(issuer, external, client)
        app.state.gate = Gatekeeper(policies, limiter, ledger, metrics)
        app.state.protector = Protector(metrics)
        app.state.offload = offload = Offload(settings.inspect_workers,
                                              settings.inspect_inline_bytes)
        offload.share_the_interpreter()
        app.state.audit = trail
        app.state.upstream = Upstream(session, pool, retry_after_s=settings.retry_after_s,
                                      connect_retries=settings.upstream_connect_retries)
        await pool.check_all(client)
        background = [
            asyncio.create_task(pool.watch(client, settings.engine_health_interval_s)),
            asyncio.create_task(policies.watch(settings.policy_reload_interval_s)),
            asyncio.create_task(ledger.keep_swept(settings.ledger_sweep_interval_s)),
            asyncio.create_task(ledger.keep_leases(settings.reservation_ttl_s)),
            asyncio.create_task(limiter.maintain()),
            asyncio.create_task(keys.keep_last_used(settings.last_used_flush_s)),
            asyncio.create_task(_refresh_signing_keys(issuer)),
        ]
        # Everything built so far lives as long as the process: out of the collector's way, a
        # full collection no longer walks the whole gateway (tens of milliseconds with the
        # interpreter lock held, which stalled every client while a large request was scanned).
        gc.freeze()
        log.info("gateway ready", extra={
            "models": sorted(pool.routes), "version": __version__,
            "engines_up": sum(e.healthy for e in pool.engines), "engines": len(pool.engines),
            "policy_version": policies.version, "shared_limits": limiter.shared,
            "database": db.dialect.name})
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ledger.stop()  # leases given back, settlements written, then the database
            # closes
            await keys.flush_last_used()
            await limiter.close()
            await client.aclose()
            await session.close()
            await db.dispose()
            offload.close()
            await trail.close()  # the last records, a signed checkpoint, fsync

    app = FastAPI(title="Enclave gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    handlers.install(app)
    app.include_router(inference.router)
    app.include_router(oauth.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.add_middleware(RequestMiddleware, metrics=metrics, access_log=settings.access_log,
                       direct=inference.DIRECT, audit=trail,
                       max_in_flight=settings.max_concurrent_requests,
                       ops_port=settings.ops_port)
    return app


async def _refresh_signing_keys(issuer: TokenIssuer, interval_s: float = 30.0) -> None:
    """Pick up keys rotated by another gateway or the CLI."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await issuer.refresh()
        except Exception:  # the next round tries again
            log.warning("could not refresh token signing keys", exc_info=True)

