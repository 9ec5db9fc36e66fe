"""A fake engine behind the gateway's injectable upstream session (``create_app(...,
session_factory=...)``): the whole request path in one process, the engine on a Unix socket.
The fake sees exactly what the gateway forwards: the contract's fields, redacted text, the
fixed path; the client sees the answer and its usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from asgi_lifespan import LifespanManager

from serving.app import create_app
from serving.container import Services
from serving.settings import Settings
from tests.support import copy_manifests, gateway_settings

pytestmark = pytest.mark.anyio
POLICIES = """
version: 1
policies:
  redacting:
    models: [demo-chat]
    scopes: [chat]
    pii: {input: redact, output: redact}
"""



class FakeEngine:
    """An OpenAI-shaped chat answer for any POST; keeps what it was sent."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.Response:
        self.seen.append((request.path_qs, await request.json()))
        return web.json_response({
            "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "demo-chat",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": "Write to jane.doe@example.com today."}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.path)).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, str]]:
    engine = FakeEngine(tmp_path / "engine.sock")
    await engine.start()
    policies = tmp_path / "redacting.yaml"
    policies.write_text(POLICIES)
    settings = gateway_settings(tmp_path, copy_manifests(tmp_path / "models"),
                                policies_file=policies)

    def to_fake(_: Settings, __: object) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(engine.path)))

    def healthy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    app = create_app(settings, transport=httpx.MockTransport(healthy), session_factory=to_fake)
    async with LifespanManager(app):
        services: Services = app.state.services
        await services.clients.create("svc", "redacting")
        key = (await services.keys.issue("svc", ["chat"])).key
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, engine, key
    await engine.stop()


async def test_the_fake_engine_sees_only_what_the_gateway_forwards(
        rig: tuple[httpx.AsyncClient, FakeEngine, str]) -> None:
    client, engine, key = rig
    resp = await client.post(
        "/v1/chat/completions?api-version=1", headers={"Authorization": f"Bearer {key}"},
        json={"model": "demo-chat", "max_tokens": 8,
              "messages": [{"role": "user", "content": "Mail bob@example.org please."}]})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["usage"]["total_tokens"] == 12
    assert "jane.doe@example.com" not in resp.text  # the answer is redacted too
    assert resp.headers["x-request-id"]
    [(path, body)] = engine.seen
    assert path == "/v1/chat/completions"  # the fixed path: the client's query is not sent
    assert "bob@example.org" not in str(body)
    assert body["model"] == "demo-chat" and body["max_tokens"] == 8
    assert set(body) <= {"model", "messages", "max_tokens", "stream", "n"}, body


async def test_an_unknown_field_never_reaches_the_fake_engine(
        rig: tuple[httpx.AsyncClient, FakeEngine, str]) -> None:
    client, engine, key = rig
    resp = await client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}],
              "kv_transfer_params": {"x": 1}})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "unsupported_parameter"
    assert engine.seen == []
