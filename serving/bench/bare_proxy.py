"""The baseline: the 20-line FastAPI proxy a team would write first (no auth, metrics or logs),
with the same HTTP client as the gateway (aiohttp), so the ratio measures what the gateway adds.

Run as ``uvicorn serving.bench.bare_proxy:app`` with ``BARE_UPSTREAM`` set.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

UPSTREAM = os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:9000")
STREAM_UPSTREAM = os.environ.get("BARE_STREAM_UPSTREAM", UPSTREAM)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(UPSTREAM) as session, \
            aiohttp.ClientSession(STREAM_UPSTREAM) as streams:
        app.state.session, app.state.streams = session, streams
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    if b'"stream":true' in body or b'"stream": true' in body:
        return await _stream(request.app.state.streams, body)
    session: aiohttp.ClientSession = request.app.state.session
    async with session.post("/v1/chat/completions", data=body,
                            headers={"content-type": "application/json"}) as upstream:
        return Response(await upstream.read(), status_code=upstream.status,
                        media_type="application/json")


async def _stream(session: aiohttp.ClientSession, body: bytes) -> Response:
    """Streams relayed as they arrive (the engine for streams is another upstream, as the
    gateway's model ``demo-stream`` is in the benchmark)."""
    upstream = await session.post("/v1/chat/completions", data=body,
                                  headers={"content-type": "application/json"})

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return StreamingResponse(relay(), status_code=upstream.status,
                             media_type="text/event-stream")
