"""Running the gateway and the engine supervisor in one event loop, stopped by Ctrl-C/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from serving import server
from serving.engines.control import READ_ONLY, ControlServer, events_path, socket_path
from serving.engines.supervisor import Supervisor
from serving.settings import Settings
from serving.storage.manifest_watch import ManifestWatcher

log = logging.getLogger("enclave.gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the caller owns shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def gateway_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    return _Server(server.config(app, settings))


async def run(settings: Settings, app: FastAPI | None, supervisor: Supervisor | None,
              on_ready: Callable[[], None] | None = None, ready_timeout_s: float = 900,
              sockets: list[socket.socket] | None = None) -> int:
    """``sockets``: listeners already bound (a worker's, inherited); else bound here."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    controls: list[ControlServer] = []
    if supervisor is not None:
        await supervisor.start()
        controls = [ControlServer(supervisor, socket_path(settings.run_dir)),
                    ControlServer(supervisor, events_path(settings.run_dir), READ_ONLY, 0o660)]
        for control in controls:
            await control.start()
    gateway = gateway_server(app, settings) if app is not None else None
    tasks: list[asyncio.Task[object]] = []
    if gateway is not None:
        try:
            sockets = sockets or server.listeners(settings)
        except OSError as exc:
            log.error("cannot listen", extra={"error": str(exc)})
            if supervisor is not None:
                await supervisor.stop()
            for control in controls:
                await control.close()
            return 1
        tasks.append(asyncio.create_task(gateway.serve(sockets=sockets)))
    watcher: asyncio.Task[None] | None = None
    if supervisor is not None:  # it follows the manifests (the gateway's watcher: lifespan)
        watcher = asyncio.create_task(_watch_manifests(settings, supervisor).run())

    async def announce() -> None:
        if supervisor is not None and not await supervisor.wait_healthy(ready_timeout_s):
            return
        while gateway is not None and not gateway.started:  # noqa: ASYNC110 (uvicorn has no event)
            await asyncio.sleep(0.1)
        if on_ready is not None:
            on_ready()

    announcer = asyncio.create_task(announce())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    announcer.cancel()
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    code = 0
    if gateway is not None:
        gateway.should_exit = True
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        if not stop.is_set():
            code = 1  # the gateway stopped by itself (port in use, start-up failure)
    if supervisor is not None:
        await supervisor.stop()  # gateways watching the socket hear each replica drain
    for control in controls:
        await control.close()
    stopper.cancel()
    return code


def _watch_manifests(settings: Settings, supervisor: Supervisor) -> ManifestWatcher:
    """Each valid new set of manifests reaches the supervisor: new versions' engines start,
    retired ones drain; the first look hands it the set it runs (nothing to do)."""
    return ManifestWatcher(
        settings.models_dir,
        lambda manifests: supervisor.update([d for m in manifests for d in m.deployments()]),
        settings.manifest_reload_interval_s)
