"""A replica that fails on purpose: an HTTP proxy in front of a real engine that injects errors.

Each inference request (a ``POST``) is answered by the mode ``plan`` returns for it: ``pass``
(forwarded to the real engine, the answer streamed back), ``error`` (500), ``hang`` (no answer
until the gateway gives up), ``close`` (the connection dropped before any answer) or ``cut``
(the answer's first bytes, then the connection dropped). ``GET /health`` and ``/metrics`` are
forwarded while ``healthy``. The request's ``model`` is rewritten to the engine's own name, so
one engine can stand behind any model a test's manifests declare. ``hits`` counts inference
requests by mode.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections import Counter
from collections.abc import Callable

import aiohttp
from aiohttp import web

from serving.bench.targets import free_port

_MODEL = re.compile(rb'"model":"[^"]*"')


def always(mode: str) -> Callable[[], str]:
    return lambda: mode


def mixed(weights: dict[str, float], seed: int = 7) -> Callable[[], str]:
    rng = random.Random(seed)
    modes, w = list(weights), list(weights.values())
    return lambda: rng.choices(modes, w)[0]


class FaultyEngine:
    def __init__(self, target_url: str, engine_model: str = "demo-chat",
                 plan: Callable[[], str] | None = None) -> None:
        self.target = target_url
        self.engine_model = engine_model
        self.plan = plan or always("pass")
        self.healthy = True
        self.port = free_port()
        self.hits: Counter[str] = Counter()
        self.traceparents: list[str | None] = []  # each inference request's, as received
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def start(self) -> FaultyEngine:
        self._thread.start()
        assert self._ready.wait(10), "the faulty engine did not start"
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()  # its self-pipe (a socket pair) with it

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_read=300)) as session:
            self._session = session
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            if not self.healthy:
                return web.Response(status=503)
            async with self._session.get(self.target + request.path) as resp:
                return web.Response(status=resp.status, body=await resp.read(),
                                    content_type=resp.content_type)
        mode = self.plan()
        with self._lock:
            self.hits[mode] += 1
            self.traceparents.append(request.headers.get("traceparent"))
        if mode == "error":
            return web.json_response({"error": {"message": "injected"}}, status=500)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "close":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
            return web.Response(status=500)
        body = _MODEL.sub(b'"model":"' + self.engine_model.encode() + b'"', await request.read(),
                          count=1)
        async with self._session.post(self.target + request.path, data=body,
                                      headers={"content-type": "application/json"}) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
                if mode == "cut":
                    assert request.transport is not None
                    request.transport.close()
                    return response
            await response.write_eof()
            return response
