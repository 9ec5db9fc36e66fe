"""Policies against the real vLLM engine: refused requests never reach it, budgets hold under
50 concurrent streams with half the clients leaving mid-stream, and the ledger survives a
gateway killed with SIGKILL, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from serving.bench.stores import PostgresServer
from serving.settings import Settings
from serving.storage.db import create_engine
from serving.storage.ledger import LedgerRepository
from serving.storage.times import day_key, month_key
from tests.support import (
    Engines,
    GatewayProcess,
    GatewayServer,
    assert_openai_error,
    bearer,
    gateway_settings,
    new_key,
    running_gateway,
    settings_env,
)

pytestmark = pytest.mark.engine
DEP = "demo-chat-v1"


def engine_tokens(engines: Engines) -> float:
    return (engines.metric(DEP, "vllm:prompt_tokens_total")
            + engines.metric(DEP, "vllm:generation_tokens_total"))


def wait_engine_idle(engines: Engines, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while engines.metric(DEP, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine is still busy"
        time.sleep(0.1)


def ledger_state(settings: Settings, client: str) -> tuple[int, int, int, int]:
    """(used today, reserved today, open reservations, tokens in the daily usage rows)."""

    async def read() -> tuple[int, int, int, int]:
        db = create_engine(settings.resolved_database_url)
        try:
            repo = LedgerRepository(db)
            now = datetime.now(UTC)
            day = day_key(now)
            counters = await repo.counters(client, [day, month_key(now)])
            usage = await repo.usage(client, day, day)
            total = sum(int(str(r["total_tokens"])) for r in usage)
            c = counters.get(day)
            return (c.used if c else 0, c.reserved if c else 0,
                    await repo.open_reservations(client), total)
        finally:
            await db.dispose()

    return asyncio.run(read())


def wait_settled(settings: Settings, client: str, timeout_s: float = 30) -> tuple[int, ...]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = ledger_state(settings, client)
        if state[2] == 0 and state[1] == 0:
            return state
        assert time.monotonic() < deadline, f"reservations still open: {state}"
        time.sleep(0.2)


def test_refused_spellings_never_reach_the_engine(gateway: GatewayServer,
                                                  engines: Engines) -> None:
    key = new_key(gateway.settings, "embed-client", "embed-only")
    h = {"Authorization": f"Bearer {key}"}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    wait_engine_idle(engines)
    before = engines.metric(DEP, "vllm:prompt_tokens_total")
    attempts = [
        ("/v1/chat/completions", {**chat, "model": "demo-chat"}, {}),
        ("/v1/chat/completions?model=minilm-embed", {**chat, "model": "demo-chat"}, {}),
        ("/v1/chat/completions", {**chat, "model": "demo-chat"}, {"model": "minilm-embed"}),
        ("/v1/embeddings", {"model": "demo-chat", "input": "x"}, {}),
        ("/v1/embeddings?model=demo-chat", {"model": "minilm-embed ", "input": "x"}, {}),
        ("/v1/embeddings", {"model": "Minilm-Embed", "input": "x"}, {}),
        ("/v1/embeddings", {"model": "demo-chat@v1", "input": "x"}, {}),
        ("/v1/embeddings", {"model": "demo-chat-v1", "input": "x"}, {}),
        ("/v1/embeddings", {"model": "minilm-embed:my-lora", "input": "x"}, {}),
        ("/v1/completions", {"model": "demo-chat", "prompt": "x"}, {}),
    ]
    for path, body, headers in attempts:
        resp = httpx.post(gateway.url + path, json=body, headers={**h, **headers}, timeout=30)
        assert resp.status_code in (403, 404), (path, body, resp.text)
    assert engines.metric(DEP, "vllm:prompt_tokens_total") == before
    # The allowed model through a pinned version works.
    ok = httpx.post(gateway.url + "/v1/embeddings", headers=h, timeout=60,
                    json={"model": "minilm-embed@v1", "input": "x"})
    assert ok.status_code == 200, ok.text


LEAVER_MAX_TOKENS = 24  # a client that leaves asks for fewer tokens: see the bound below
LEAVE_AFTER = 5


async def _streams(url: str, key: str, n: int) -> tuple[int, int, int]:
    """n concurrent streams; every other client leaves after a few events.
    Returns (completed, abandoned, refused for quota)."""
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "count to ten"}],
            "max_tokens": 64, "ignore_eos": True, "stream": True}
    leaver = {**body, "max_tokens": LEAVER_MAX_TOKENS}
    results = {"done": 0, "left": 0, "quota": 0}
    broken: list[str] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        # In order, a few milliseconds apart: both kinds of client are among the first the
        # budget admits (all at once, the order they reach admission is the machine's whim).
        await asyncio.sleep(0.005 * i)
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=leaver if i % 2 else body) as resp:
            if resp.status_code == 429:
                assert (await resp.aread()) and resp.json()["error"]["code"] == \
                    "insufficient_quota"
                results["quota"] += 1
                return
            assert resp.status_code == 200, await resp.aread()
            events = 0
            async for line in resp.aiter_lines():
                if line.startswith('data: {"error"'):
                    broken.append(line[:300])
                if line.startswith("data: {"):
                    assert '"usage"' not in line  # the per-event usage is not shown
                    events += 1
                    if i % 2 and events >= LEAVE_AFTER:
                        results["left"] += 1
                        return  # leaving the block closes the connection mid-stream
            results["done"] += 1

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                 limits=limits) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    assert not broken, broken  # every admitted stream ran until it ended or its client left
    return results["done"], results["left"], results["quota"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_budget_holds_under_concurrent_streams_and_matches_the_engine(
        tmp_path: Path, engines: Engines, request: pytest.FixtureRequest, backend: str) -> None:
    overrides: dict[str, object] = {}
    if backend == "postgresql":
        pg: PostgresServer = request.getfixturevalue("postgres")
        overrides["database_url"] = pg.new_database()
    settings = gateway_settings(tmp_path, engines.models_dir, **overrides)
    key = new_key(settings, "budget-client", "budgeted")
    wait_engine_idle(engines)
    before = engine_tokens(engines)
    with running_gateway(settings) as gateway:
        done, left, quota = asyncio.run(_streams(gateway.url, key, 50))
        assert done + left + quota == 50 and done > 0 and left > 0
        used, _, _, usage_total = wait_settled(settings, "budget-client")
        wait_engine_idle(engines)
        engine_used = engine_tokens(engines) - before
        assert used <= 4000  # the budget (policy "budgeted": 4000 tokens a day)
        assert quota > 0  # the budget was reached: the others were refused, not served
        assert used == usage_total
        # The engine's own counters: every token it reported for these requests is charged.
        # An abandoned stream runs on, uncharged, until vLLM sees the closed connection, and
        # vLLM's engine core may be steps ahead of what its API server has streamed: on a
        # starved 2-core CI machine that was 25 tokens a stream on average. The hard bound is
        # what a leaver asked for beyond the tokens it read (its first event holds only the role).
        slack = (LEAVER_MAX_TOKENS - (LEAVE_AFTER - 1)) * left
        assert used <= engine_used <= used + slack, (used, engine_used, left)
        # Spending the rest one request at a time ends with a refusal, never an overspend.
        with httpx.Client(headers=bearer(key), timeout=60) as client:
            for _ in range(60):
                resp = client.post(gateway.url + "/v1/chat/completions",
                                   json={"model": "demo-chat", "max_tokens": 64,
                                         "ignore_eos": True,
                                         "messages": [{"role": "user", "content": "more"}]})
                if resp.status_code != 200:
                    break
        assert assert_openai_error(resp, 429)["code"] == "insufficient_quota"
        assert int(resp.headers["retry-after"]) > 0
        assert wait_settled(settings, "budget-client")[0] <= 4000


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_ledger_survives_a_gateway_killed_mid_load(tmp_path: Path, engines: Engines,
                                                        request: pytest.FixtureRequest,
                                                        backend: str) -> None:
    overrides: dict[str, object] = {"reservation_ttl_s": 10, "ledger_sweep_interval_s": 1}
    if backend == "postgresql":
        pg: PostgresServer = request.getfixturevalue("postgres")
        overrides["database_url"] = pg.new_database()
    settings = gateway_settings(tmp_path, engines.models_dir, **overrides)
    key = new_key(settings, "crashy", "budgeted")
    first = GatewayProcess(settings, settings_env(settings), tmp_path / "gw1.log").start()

    async def load() -> None:
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 64, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                     timeout=60) as client:

            async def one() -> None:
                try:
                    async with client.stream("POST", first.url + "/v1/chat/completions",
                                             json=body) as resp:
                        async for _ in resp.aiter_lines():
                            pass
                except httpx.HTTPError:
                    pass  # the gateway died under it

            tasks = [asyncio.create_task(one()) for _ in range(12)]
            try:
                deadline = time.monotonic() + 30
                while (await asyncio.to_thread(ledger_state, settings, "crashy"))[1] == 0:
                    assert time.monotonic() < deadline, "no budget was ever reserved"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # streams under way
            finally:
                first.kill()  # SIGKILL mid-load: no shutdown, no settlement
            await asyncio.gather(*tasks)

    asyncio.run(load())
    _, reserved, open_, _ = ledger_state(settings, "crashy")
    assert open_ > 0 and reserved > 0  # the dead gateway left its lease behind
    second = GatewayProcess(settings, settings_env(settings), tmp_path / "gw2.log").start()
    try:
        used, reserved, open_, usage_total = wait_settled(settings, "crashy", timeout_s=30)
        assert (reserved, open_) == (0, 0)  # its lease expired and was released
        assert used == usage_total  # nothing settled twice, nothing half-written
        client = OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0)
        out = client.chat.completions.create(model="demo-chat", max_tokens=8,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.usage is not None
        after = wait_settled(settings, "crashy")
        assert after[0] == used + out.usage.total_tokens
    finally:
        second.stop()


def test_concurrency_limit_refuses_the_extra_request(gateway: GatewayServer) -> None:
    key = new_key(gateway.settings, "two-at-a-time", "limited")

    async def run() -> list[int]:
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                     timeout=60) as client:

            async def one() -> int:
                async with client.stream("POST", gateway.url + "/v1/chat/completions",
                                         json=body) as resp:
                    await resp.aread()
                    return resp.status_code

            return await asyncio.gather(*(one() for _ in range(4)))

    codes = asyncio.run(run())
    assert sorted(codes) == [200, 200, 429, 429]


def test_a_pinned_version_is_served(gateway: GatewayServer, api_key: str) -> None:
    client = OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0)
    out = client.chat.completions.create(model="demo-chat@v1", max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}])
    assert out.choices and out.usage is not None


def test_a_policy_default_max_tokens_is_applied(tmp_path: Path, engines: Engines) -> None:
    settings = gateway_settings(tmp_path, engines.models_dir)
    key = new_key(settings, "capped", "budgeted")
    with running_gateway(settings) as gw:
        client = OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        out = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}],
            extra_body={"ignore_eos": True})
        assert out.usage is not None and out.usage.completion_tokens == 64  # the cap
        with pytest.raises(Exception, match="at most 64"):
            client.chat.completions.create(
                model="demo-chat", max_tokens=65, messages=[{"role": "user", "content": "x"}])
