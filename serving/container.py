"""The gateway's long-lived services, typed and built in one place.

``open_services`` builds them for a running gateway (the app's lifespan), starts their
background tasks and closes them in order; the web layer reads them through one accessor
(``routes.deps.services``). ``StateServices`` is the part the CLI shares with the gateway: the
same key, client, policy and signing services on the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from serving import __version__
from serving.admission.budgets import BudgetLedger
from serving.admission.gate import Gatekeeper
from serving.admission.idempotency import IdempotencyService
from serving.admission.policy_store import PolicyStore
from serving.admission.ratelimits import RateLimiter
from serving.audit.trail import AuditTrail
from serving.auth.clients import ClientService
from serving.auth.keys import KeyService
from serving.auth.tokens import ExternalIdP, TokenIssuer, TokenVerifier
from serving.domain.manifest import Manifest
from serving.metrics import GatewayMetrics
from serving.pipeline.offload import Offload
from serving.protection.protector import Protector
from serving.rollouts.controller import Paths, RolloutController
from serving.rollouts.follower import RolloutFollower
from serving.rollouts.recorder import RolloutRecorder
from serving.rollouts.service import RolloutService
from serving.settings import Settings
from serving.storage import migrate
from serving.storage.clients import ClientRepository
from serving.storage.db import create_engine
from serving.storage.idempotency import IdempotencyRepository
from serving.storage.keys import KeyRepository
from serving.storage.ledger import LedgerRepository
from serving.storage.manifest_watch import ManifestWatcher
from serving.storage.rollouts import RolloutRepository
from serving.storage.signing import SigningKeyRepository
from serving.tracing import Tracing
from serving.upstream.client import Upstream, new_session
from serving.upstream.pool import EnginePool

log = logging.getLogger("enclave.gateway")
SessionFactory = Callable[[Settings, ssl.SSLContext | None], aiohttp.ClientSession]


@dataclass(frozen=True, slots=True)
class StateServices:
    """The services over the state database: what the CLI and the gateway share."""

    settings: Settings
    keys: KeyService
    clients: ClientService
    policies: PolicyStore
    ledger: LedgerRepository
    issuer: TokenIssuer
    rollouts: RolloutService


def state_services(settings: Settings, db: AsyncEngine, pepper: bytes, policies: PolicyStore,
                   *, cache_ttl_s: float = 0.0) -> StateServices:
    """The state services on ``db``; the CLI reads through (no cache), the gateway caches."""
    return StateServices(
        settings=settings,
        keys=KeyService(KeyRepository(db), pepper, cache_ttl_s,
                        settings.unknown_key_lookups_per_minute),
        clients=ClientService(ClientRepository(db), policies, cache_ttl_s),
        policies=policies, ledger=LedgerRepository(db),
        issuer=TokenIssuer(SigningKeyRepository(db), pepper, settings.oauth_issuer,
                           settings.oauth_audience, settings.oauth_token_ttl_s),
        rollouts=RolloutService(RolloutRepository(db), settings.models_dir, settings.evals_dir))


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a running gateway's request path uses, built once per process."""

    settings: Settings
    metrics: GatewayMetrics
    pool: EnginePool
    policies: PolicyStore
    keys: KeyService
    clients: ClientService
    ledger: BudgetLedger
    issuer: TokenIssuer
    tokens: TokenVerifier
    gate: Gatekeeper
    protector: Protector
    offload: Offload
    audit: AuditTrail
    upstream: Upstream
    tracing: Tracing
    idempotency: IdempotencyService
    rollouts: RolloutService
    manifests: ManifestWatcher


def default_session(settings: Settings, tls: ssl.SSLContext | None = None
                    ) -> aiohttp.ClientSession:
    return new_session(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s,
                       settings.upstream_keepalive_s, tls)


@contextlib.asynccontextmanager
async def open_services(settings: Settings, pepper: bytes, metrics: GatewayMetrics,
                        pool: EnginePool, policies: PolicyStore, trail: AuditTrail,
                        external: ExternalIdP | None, recorder: RolloutRecorder, *,
                        transport: httpx.AsyncBaseTransport | None = None,
                        session_factory: SessionFactory = default_session,
                        ) -> AsyncIterator[Services]:
    """Open the gateway's services, run their background tasks, close them in order."""
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
    session = session_factory(settings, pool.ssl)
    # Engine health and load go through their own client: the engines' private CA.
    engine_client = httpx.AsyncClient(timeout=5.0, transport=transport, trust_env=False,
                                      follow_redirects=False,
                                      verify=pool.ssl if pool.ssl is not None else True)
    # A concurrency slot in Redis outlives any request; one left by a dead gateway expires.
    limiter = RateLimiter(settings.redis_url,
                          lease_ttl_s=max(600.0, 5 * settings.upstream_read_timeout_s))
    state = state_services(settings, db, pepper, policies, cache_ttl_s=settings.key_cache_ttl_s)
    ledger = BudgetLedger(state.ledger, settings.reservation_ttl_s)
    ledger.start()
    await state.issuer.start()
    tracing = Tracing(settings.otlp_endpoint, sample_ratio=settings.otlp_sample_ratio,
                      resource={"enclave.gateway": f"{settings.host}:{settings.port}",
                                "enclave.worker": settings.worker or 0})
    idempotency = IdempotencyService(
        IdempotencyRepository(db), pepper, ttl_s=settings.idempotency_ttl_s,
        max_answer_bytes=settings.idempotency_max_answer_bytes)
    rollout_repo = state.rollouts.repo
    gateway_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(3).hex()}"
    follower = RolloutFollower(rollout_repo, pool, recorder, metrics, gateway_id)
    controller = RolloutController(
        rollout_repo, pool, Paths(settings.models_dir, settings.evals_dir, settings.cache_dir,
                                  settings.engine_env_dir, settings.resolved_supervisor_socket),
        trail, metrics, engine_client, gateway_id,
        reload_wait_s=2 * settings.manifest_reload_interval_s + 1.0,
        flush_grace_s=settings.rollout_follow_interval_s + 1.0)
    offload = Offload(settings.inspect_workers, settings.inspect_inline_bytes)
    offload.share_the_interpreter()
    services = Services(
        settings=settings, metrics=metrics, pool=pool, policies=policies, keys=state.keys,
        clients=state.clients, ledger=ledger, issuer=state.issuer,
        tokens=TokenVerifier(state.issuer, external, client),
        gate=Gatekeeper(policies, limiter, ledger, metrics), protector=Protector(metrics),
        offload=offload, audit=trail, tracing=tracing, idempotency=idempotency,
        upstream=Upstream(session, pool, metrics, retry_after_s=settings.retry_after_s,
                          max_attempts=settings.upstream_max_attempts,
                          first_byte_timeout_s=settings.upstream_first_byte_timeout_s,
                          on_failed_attempt=recorder.attempt_failed),
        rollouts=state.rollouts, manifests=_manifest_watcher(settings, pool, policies, metrics))
    metrics.prime({name: [r.name for r in route.replicas] for name, route in pool.routes.items()})
    await pool.check_all(engine_client)
    await _first(follower.sync)  # a gateway restarted mid-rollout routes by its weights at once
    background = [
        asyncio.create_task(pool.watch(engine_client, settings.engine_health_interval_s)),
        asyncio.create_task(pool.keep_resolved()),
        asyncio.create_task(pool.follow_supervisor(settings.resolved_supervisor_socket)),
        asyncio.create_task(policies.watch(settings.policy_reload_interval_s)),
        asyncio.create_task(ledger.keep_swept(settings.ledger_sweep_interval_s)),
        asyncio.create_task(idempotency.keep_swept(settings.ledger_sweep_interval_s)),
        asyncio.create_task(ledger.keep_leases(settings.reservation_ttl_s)),
        asyncio.create_task(limiter.maintain()),
        asyncio.create_task(state.keys.keep_last_used(settings.last_used_flush_s)),
        asyncio.create_task(_refresh_signing_keys(state.issuer)),
        asyncio.create_task(services.manifests.run()),
        asyncio.create_task(follower.run(settings.rollout_follow_interval_s)),
    ]
    if settings.rollout_controller:
        background.append(asyncio.create_task(controller.run()))
    log.info("gateway ready", extra={
        "models": sorted(pool.routes), "version": __version__,
        "engines_up": sum(e.healthy for e in pool.engines), "engines": len(pool.engines),
        "policy_version": policies.version, "shared_limits": limiter.shared,
        "database": db.dialect.name})
    try:
        yield services
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await idempotency.close()
        await ledger.stop()  # leases given back, settlements written, then the database closes
        await state.keys.flush_last_used()
        await limiter.close()
        await client.aclose()
        await engine_client.aclose()
        await session.close()
        await db.dispose()
        offload.close()
        await tracing.aclose()
        await trail.close()  # the last records, a signed checkpoint, fsync


def _manifest_watcher(settings: Settings, pool: EnginePool, policies: PolicyStore,
                      metrics: GatewayMetrics) -> ManifestWatcher:
    """The routes follow the manifests; a set the pool refuses (ValueError: a plain-HTTP or
    public endpoint) is logged by the watcher and the running set stays."""

    def apply(manifests: list[Manifest]) -> None:
        pool.update(manifests)
        # A new model may be named by the next policy file; one that left stays known, so
        # the policies in force keep loading.
        policies.known_models.update(pool.routes)
        metrics.prime({name: [r.name for r in route.replicas]
                       for name, route in pool.routes.items()})

    return ManifestWatcher(settings.models_dir, apply, settings.manifest_reload_interval_s)


async def _first(sync: Callable[[], Awaitable[None]]) -> None:
    try:
        await sync()
    except Exception:  # the follower's loop tries again
        log.warning("could not read the rollouts under way", exc_info=True)


async def _refresh_signing_keys(issuer: TokenIssuer, interval_s: float = 30.0) -> None:
    """Pick up keys rotated by another gateway or the CLI."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await issuer.refresh()
        except Exception:  # the next round tries again
            log.warning("could not refresh token signing keys", exc_info=True)
