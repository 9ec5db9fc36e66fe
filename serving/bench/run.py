"""One benchmark run: every target measured in the same run, rounds interleaved, medians kept.

Proxy overhead: nginx answers a canned chat completion; we load (a) nginx directly, (b) the
bare FastAPI proxy, (c) the gateway with every guard on (auth, policy, rate limits, budget
reservation and settlement in the ledger, metrics, JSON logging) on SQLite, and optionally
(d) the same on PostgreSQL + Redis, at concurrency 1, 16 and 64. End to end: the real vLLM
engine directly and through the gateway.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.bench import stores as servers
from serving.bench import targets, wrk

CHAT_BODY = json.dumps({"model": "demo-chat", "max_tokens": 16,
                        "messages": [{"role": "user", "content": "Say hello."}]})
E2E_BODY = json.dumps({"model": "demo-chat", "max_tokens": 32, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Tell me a story."}]})


@dataclass
class Cell:
    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def median_cell(target: str, c: int, results: list[wrk.Result]) -> Cell:
    return Cell(target, c, statistics.median(r.rps for r in results),
                statistics.median(r.p50_ms for r in results),
                statistics.median(r.p99_ms for r in results), sum(r.errors for r in results))


def _measure(plan: dict[str, tuple[str, str | None]], body: str, concurrencies: list[int],
             seconds: float, rounds: int, say: Callable[[str], None]) -> list[Cell]:
    cells = []
    for c in concurrencies:
        for url, key in plan.values():  # warm-up: connections, caches
            wrk.run(url, body, c, 1, key)
        raw: dict[str, list[wrk.Result]] = {name: [] for name in plan}
        for r in range(rounds):
            for name, (url, key) in plan.items():
                say(f"c={c} round {r + 1}/{rounds}: {name}")
                raw[name].append(wrk.run(url, body, c, seconds, key))
        cells += [median_cell(name, c, results) for name, results in raw.items()]
    return cells


def proxy_overhead(seconds: float, rounds: int, concurrencies: list[int], models_dir: Path,
                   say: Callable[[str], None], shared_state: bool = False) -> list[Cell]:
    """``shared_state``: also measure a gateway on PostgreSQL + Redis (started here)."""
    with tempfile.TemporaryDirectory(prefix="enclave-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        upstream = stack.enter_context(targets.nginx(root / "nginx"))
        port = int(upstream.rsplit(":", 1)[1])
        models = targets.bench_models(root, {"demo-chat": port}, models_dir)
        bare = stack.enter_context(targets.bare_proxy(root, upstream))
        gateway, key = stack.enter_context(targets.gateway(root / "gw-sqlite", models))
        plan = {"upstream": (upstream + "/v1/chat/completions", None),
                "bare proxy": (bare + "/v1/chat/completions", None),
                "gateway": (gateway + "/v1/chat/completions", key)}
        if shared_state:
            say("starting PostgreSQL and Redis")
            pg = servers.PostgresServer().start()
            stack.callback(pg.stop)
            redis = servers.RedisServer(root / "redis").start()
            stack.callback(redis.stop)
            shared, shared_key = stack.enter_context(targets.gateway(
                root / "gw-shared", models, pg.new_database(), redis.url))
            plan["gateway pg+redis"] = (shared + "/v1/chat/completions", shared_key)
        return _measure(plan, CHAT_BODY, concurrencies, seconds, rounds, say)


def end_to_end(seconds: float, rounds: int, concurrency: int, models_dir: Path,
               say: Callable[[str], None]) -> list[Cell]:
    with tempfile.TemporaryDirectory(prefix="enclave-bench-e2e-") as tmp:
        root = Path(tmp)
        models = targets.bench_models(root, {"demo-chat": targets.free_port()}, models_dir)
        say("starting a vLLM engine for demo-chat (about a minute)")
        with targets.engine(root, models) as engine, targets.gateway(root, models) as (gw, key):
            plan = {"vLLM direct": (engine + "/v1/chat/completions", None),
                    "via gateway": (gw + "/v1/chat/completions", key)}
            return _measure(plan, E2E_BODY, [concurrency], seconds, rounds, say)


def to_json(cells: list[Cell]) -> list[dict[str, object]]:
    return [asdict(c) for c in cells]
