"""Transport limits on a real server: receive deadlines for slow clients, the concurrency
ceiling, the operations listener, and the budget of unknown key ids per address."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from serving.auth.keys import PREFIX, KeyService, LookupsThrottled
from serving.storage.keys import KeyRecord
from tests.support import (
    GatewayServer,
    assert_openai_error,
    bearer,
    engineless_gateway,
    free_port,
    new_key,
)

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    yield from engineless_gateway(tmp_path_factory, "gw-transport", header_timeout_s=1.5,
                                  body_timeout_s=1.5, max_concurrent_requests=2,
                                  ops_port=free_port(), unknown_key_lookups_per_minute=5)


def _trickle(port: int, data: bytes, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time; return what came back and when the server closed."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.05)
    started = time.monotonic()
    received = b""
    try:
        for byte in data:
            if time.monotonic() - started > limit_s:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            deadline = time.monotonic() + every_s
            closed = False
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
            if closed:
                break
        return received, time.monotonic() - started
    finally:
        sock.close()


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline(gw: GatewayServer) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    received, took = _trickle(gw.port, request, every_s=0.25, limit_s=10)
    assert 1.4 <= took < 3.5, took
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in received


def test_a_body_sent_a_byte_at_a_time_is_cut_off_at_the_deadline(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "trickle")
    body = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "' + b"x" * 200
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 10}\r\n\r\n")
    received, took = _trickle(gw.port, head.encode() + body, every_s=0.02, limit_s=10)
    assert took < 5.0, took
    assert b"408" in received.split(b"\r\n", 1)[0]


def test_a_connection_that_never_sends_is_closed(gw: GatewayServer) -> None:
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.settimeout(5)
    started = time.monotonic()
    try:
        data = sock.recv(4096)
    finally:
        sock.close()
    assert 1.4 <= time.monotonic() - started < 3.5
    assert data.startswith(b"HTTP/1.1 408 ")


def test_requests_beyond_the_ceiling_get_503_but_health_checks_pass(gw: GatewayServer) -> None:
    key = new_key(gw.settings, "ceiling")

    async def main() -> None:
        # Two requests held in progress (their bodies arrive slowly), then a third.
        writers = []
        for _ in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n{{")
                         .encode())
            await writer.drain()
            writers.append(writer)
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=gw.url) as client:
            busy = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            health = await client.get("/healthz")
        for writer in writers:
            writer.close()
        assert assert_openai_error(busy, 503)["code"] == "overloaded"
        assert busy.headers["retry-after"] == "1"
        assert health.status_code == 200

    asyncio.run(main())


def test_metrics_and_readiness_detail_live_on_the_operations_listener(gw: GatewayServer) -> None:
    ops = f"http://127.0.0.1:{gw.settings.ops_port}"
    assert httpx.get(gw.url + "/metrics").status_code == 404
    assert httpx.get(gw.url + "/readyz").json() == {"status": "not_ready"}
    assert httpx.get(gw.url + "/healthz").status_code == 200
    metrics = httpx.get(ops + "/metrics")
    assert metrics.status_code == 200 and "enclave_requests_total" in metrics.text
    assert set(httpx.get(ops + "/readyz").json()["models"]) == {"demo-chat", "minilm-embed"}
    assert httpx.get(ops + "/healthz").status_code == 200
    # The operations listener serves nothing else.
    assert httpx.get(ops + "/v1/models").status_code == 404
    assert httpx.post(ops + "/v1/chat/completions", json=CHAT).status_code == 404


def test_made_up_key_ids_are_throttled_per_address_and_real_keys_still_work(
        gw: GatewayServer) -> None:
    real = new_key(gw.settings, "real")
    assert httpx.get(gw.url + "/v1/models", headers=bearer(real)).status_code == 200
    statuses = []
    for i in range(8):
        fake = f"{PREFIX}{i:012x}-" + "x" * 43
        statuses.append(httpx.get(gw.url + "/v1/models", headers=bearer(fake)).status_code)
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    # The real key is cached: it keeps working from the same address.
    assert httpx.get(gw.url + "/v1/models", headers=bearer(real)).status_code == 200


class _CountingRepo:
    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.gets = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        return self.record if key_id == self.record.id else None


def test_unknown_ids_never_evict_real_keys_and_cost_one_query_each() -> None:
    record = KeyRecord(id="aaaaaaaaaaaa", name="real", digest="0" * 64,
                       created_at=datetime.now(UTC), revoked_at=None, client_id="c",
                       client_policy="default")
    repo = _CountingRepo(record)
    keys = KeyService(repo, b"p" * 32, cache_ttl_s=60,  # type: ignore[arg-type]
                      unknown_per_minute=10**6)

    async def main() -> None:
        assert await keys._lookup(record.id) is record
        for i in range(20_000):
            await keys._lookup(f"{i:012x}")
        assert repo.gets == 20_001
        assert await keys._lookup(record.id) is record  # still cached
        await keys._lookup("000000000001")  # a miss is cached too
        assert repo.gets == 20_001
        throttled = KeyService(repo, b"p" * 32, cache_ttl_s=60,  # type: ignore[arg-type]
                               unknown_per_minute=2)
        assert await throttled._lookup(record.id, "10.0.0.9") is record  # not a miss
        await throttled._lookup("bbbbbbbbbbbb", "10.0.0.9")
        await throttled._lookup("cccccccccccc", "10.0.0.9")
        with pytest.raises(LookupsThrottled):
            await throttled._lookup("dddddddddddd", "10.0.0.9")
        assert await throttled._lookup(record.id, "10.0.0.9") is record  # cached: served
        assert await throttled._lookup("dddddddddddd", "10.0.0.10") is None  # another address

    asyncio.run(main())
