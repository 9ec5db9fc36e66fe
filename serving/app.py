"""The app factory. The only module that wires layers together; nothing imports it but the CLI
and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from serving import __version__
from serving.metrics import GatewayMetrics
from serving.routes import handlers, inference, ops
from serving.routes.middleware import RequestMiddleware
from serving.services.auth import KeyService
from serving.services.engines import EnginePool
from serving.services.proxy import Upstream, new_session
from serving.settings import Settings, is_allowed_engine_host
from serving.storage.db import create_engine, create_schema
from serving.storage.keys import KeyRepository
from serving.storage.manifests import load_manifests

log = logging.getLogger("enclave.gateway")


def create_app(settings: Settings, *, engine_host: str = "127.0.0.1",
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build the gateway. Fails fast on unsafe settings or bad manifests."""
    pepper = settings.load_pepper()
    manifests = load_manifests(settings.models_dir)
    if not is_allowed_engine_host(engine_host, settings.allow_remote_engines):
        raise ValueError(f"engine host {engine_host} is not loopback or private; set "
                         "ENCLAVE_ALLOW_REMOTE_ENGINES=true only behind a closed network")
    metrics = GatewayMetrics()
    pool = EnginePool(manifests, engine_host=engine_host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = create_engine(settings.resolved_database_url)
        await create_schema(db)
        # Health checks go through httpx; the proxied requests through aiohttp (hot path).
        client = httpx.AsyncClient(timeout=5.0, transport=transport, trust_env=False,
                                   follow_redirects=False)
        session = new_session(settings.upstream_connect_timeout_s,
                              settings.upstream_read_timeout_s)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.pool = pool
        app.state.keys = KeyService(KeyRepository(db), pepper, settings.key_cache_ttl_s)
        app.state.upstream = Upstream(session, pool, retry_after_s=settings.retry_after_s,
                                      connect_retries=settings.upstream_connect_retries)
        await pool.check_all(client)
        watcher = asyncio.create_task(pool.watch(client, settings.engine_health_interval_s))
        log.info("gateway ready", extra={
            "models": sorted(pool.routes), "version": __version__,
            "engines_up": sum(e.healthy for e in pool.engines), "engines": len(pool.engines)})
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await client.aclose()
            await session.close()
            await db.dispose()

    app = FastAPI(title="Enclave gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    handlers.install(app)
    app.include_router(inference.router)
    app.include_router(ops.router)
    app.add_middleware(RequestMiddleware, metrics=metrics, access_log=settings.access_log)
    return app
