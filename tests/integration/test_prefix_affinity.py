"""Prefix affinity against least-load and round-robin, on the two real demo-chat replicas, in
one run: many conversations (four turns each) sharing a few long system prompts, streamed.
Each policy is a model of its own (same engines, through pass-through proxies that give the
engines their own model name) and gets system prompts of its own, so no policy profits from
another's cache. The engines' prefix-cache hit rate (``vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total`` over the run) and the time to the first streamed event are
printed and compared."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_routing_faults import remote_manifests, settings_for
from tests.support import Engines, bearer, new_key, running_gateway
from tests.support.faults import FaultyEngine

pytestmark = pytest.mark.engine
POLICIES = {"affinity": {"prefix_affinity": True},
            "least-load": {"prefix_affinity": False},
            "round-robin": {"balance": "round_robin"}}
SYSTEM_PROMPTS = 4
CONVERSATIONS = 4  # per system prompt
TURNS = 4
WORDS = ["ledger", "invoice", "customer", "account", "balance", "policy", "contract",
         "region", "service", "quarter", "report", "schedule", "review", "shipment",
         "supplier", "warehouse", "inventory", "forecast", "budget"]


def system_prompt(rng: random.Random) -> str:
    return "You are the assistant of a logistics company. " + " ".join(
        rng.choice(WORDS) for _ in range(100))


def conversation(system: str, rng: random.Random) -> list[list[dict[str, str]]]:
    """The messages of each turn: turn t repeats turns 1..t-1 (as chat clients do)."""
    messages = [{"role": "system", "content": system}]
    turns = []
    for _ in range(TURNS):
        messages = [*messages, {"role": "user", "content": " ".join(
            rng.choice(WORDS) for _ in range(30))}]
        turns.append(messages)
        messages = [*messages, {"role": "assistant", "content": " ".join(
            rng.choice(WORDS) for _ in range(80))}]
    return turns


@pytest.fixture
def pass_proxies(engines: Engines) -> Iterator[list[FaultyEngine]]:
    urls = [engines.url(r) for r in engines.replicas("demo-chat-v1")]
    started = [FaultyEngine(url).start() for url in urls]
    try:
        yield started
    finally:
        for proxy in started:
            proxy.stop()


def cache_totals(engines: Engines) -> tuple[float, float]:
    return (engines.metric("demo-chat-v1", "vllm:prefix_cache_hits_total"),
            engines.metric("demo-chat-v1", "vllm:prefix_cache_queries_total"))


async def run_policy(url: str, key: str, model: str, seed: int) -> list[float]:
    """Every conversation's turns in order, conversations four at a time; time to first event
    of each request."""
    rng = random.Random(seed)
    systems = [system_prompt(rng) for _ in range(SYSTEM_PROMPTS)]
    convs = [conversation(systems[i % SYSTEM_PROMPTS], rng)
             for i in range(SYSTEM_PROMPTS * CONVERSATIONS)]
    rng.shuffle(convs)
    ttfts: list[float] = []
    sem = asyncio.Semaphore(4)

    async def talk(client: httpx.AsyncClient, turns: list[list[dict[str, str]]]) -> None:
        async with sem:
            for messages in turns:
                start = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/chat/completions", headers=bearer(key),
                                         json={"model": model, "messages": messages,
                                               "max_tokens": 8, "ignore_eos": True,
                                               "stream": True}) as resp:
                    assert resp.status_code == 200
                    async for _ in resp.aiter_bytes():
                        if first is None:
                            first = time.perf_counter() - start
                assert first is not None
                ttfts.append(first)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(talk(client, turns) for turns in convs))
    return ttfts


def test_prefix_affinity_raises_the_engines_cache_hit_rate(
        engines: Engines, pass_proxies: list[FaultyEngine], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    results: dict[str, tuple[float, float]] = {}
    urls = [p.url for p in pass_proxies]
    for i, (name, routing) in enumerate(POLICIES.items()):
        root = tmp_path / name
        settings = settings_for(root, remote_manifests(root, {"demo-chat": urls}, **routing))
        with running_gateway(settings) as gw:
            key = new_key(settings, "affinity", "default")
            hits0, queries0 = cache_totals(engines)
            ttfts = asyncio.run(run_policy(gw.url, key, "demo-chat", seed=100 + i))
            hits1, queries1 = cache_totals(engines)
        results[name] = ((hits1 - hits0) / max(queries1 - queries0, 1),
                         statistics.median(ttfts))
    with capsys.disabled():
        print(f"\nprefix cache on {SYSTEM_PROMPTS} system prompts x {CONVERSATIONS} "
              f"conversations x {TURNS} turns, 2 replicas:")
        for name, (rate, ttft) in results.items():
            print(f"  {name:<12} hit rate {rate:6.1%}   time to first event p50 "
                  f"{ttft * 1000:7.1f} ms")
    affinity, least, rr = results["affinity"], results["least-load"], results["round-robin"]
    # The time to first event is printed, not asserted (a timing assertion on a shared 2-core
    # machine would be a flaky test; the README's benchmark section reports it).
    assert affinity[0] > least[0] and affinity[0] > rr[0], results
