"""The baseline: the 20-line FastAPI proxy a team would write first (no auth, metrics or logs),
with the same HTTP client as the gateway (aiohttp), so the ratio measures what the gateway adds.

Run as ``uvicorn serving.bench.bare_proxy:app`` with ``BARE_UPSTREAM`` set.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request, Response

UPSTREAM = os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:9000")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(UPSTREAM) as session:
        app.state.session = session
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    session: aiohttp.ClientSession = request.app.state.session
    async with session.post("/v1/chat/completions", data=await request.body(),
                            headers={"content-type": "application/json"}) as upstream:
        return Response(await upstream.read(), status_code=upstream.status,
                        media_type="application/json")
