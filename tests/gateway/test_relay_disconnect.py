"""The gateway closes its connection to the engine the moment the client goes away.

The upstream here is a stand-in (a raw asyncio server, named as such): the test needs to see
the TCP close itself, at the exact moment it happens, which the real engine does not expose.
The real engine's side of it (vLLM aborting) is tested in tests/integration/test_disconnects.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    GatewayServer,
    copy_manifests,
    free_port,
    gateway_settings,
    new_key,
    running_gateway,
)

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100}


class StandInEngine:
    """Answers /health; for a completion it either streams an event every 20 ms or holds the
    answer back for 5 s, and records when the gateway's connection closed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.closed_at: float | None = None
        self.events_sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()
            await asyncio.Event().wait()

        self._loop.run_until_complete(main())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                return
            data += chunk
        if data.startswith(b"GET /health"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        streaming = b'"stream":true' in data or b'"stream": true' in data
        if not streaming:
            body = data.partition(b"\r\n\r\n")[2]
            await self._wait_for_close(reader, body)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        try:
            for _ in range(500):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                self.events_sent += 1
                await asyncio.sleep(0.02)
                if reader.at_eof():
                    raise ConnectionResetError
        except (ConnectionResetError, BrokenPipeError):
            self.closed_at = time.monotonic()

    async def _wait_for_close(self, reader: asyncio.StreamReader, _: bytes) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                got = await asyncio.wait_for(reader.read(65536), timeout=0.02)
            except TimeoutError:
                continue
            if got == b"":
                self.closed_at = time.monotonic()
                return


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[StandInEngine, GatewayServer, str]]:
    engine = StandInEngine()
    models = copy_manifests(tmp_path / "models", {"demo-chat": engine.port})
    with running_gateway(gateway_settings(tmp_path, models)) as gw:
        key = new_key(gw.settings, "t")
        deadline = time.monotonic() + 10
        while httpx.get(gw.url + "/readyz").json()["models"]["demo-chat"] is not True:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield engine, gw, key


def test_leaving_mid_stream_closes_the_upstream_at_once(
        stand_in: tuple[StandInEngine, GatewayServer, str]) -> None:
    engine, gw, key = stand_in
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        lines = resp.iter_lines()
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data:")
    left = time.monotonic()
    deadline = left + 2
    while engine.closed_at is None:
        assert time.monotonic() < deadline, "the gateway kept the upstream open"
        time.sleep(0.01)
    assert engine.closed_at - left < 0.5
    assert engine.events_sent < 100


def test_leaving_before_the_answer_closes_the_upstream_at_once(
        stand_in: tuple[StandInEngine, GatewayServer, str]) -> None:
    engine, gw, key = stand_in

    async def abandon() -> float:
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(client.post(
                gw.url + "/v1/chat/completions", json=CHAT,
                headers={"Authorization": f"Bearer {key}"}))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return time.monotonic()

    left = asyncio.run(abandon())
    deadline = left + 2
    while engine.closed_at is None:
        assert time.monotonic() < deadline, "the gateway kept the upstream open"
        time.sleep(0.01)
    assert engine.closed_at - left < 0.5
