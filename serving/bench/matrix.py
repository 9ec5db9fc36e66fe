"""The cost matrix (issue 15): what the gateway costs as prompts grow, per byte.

Prompt sizes 0.1, 4 and 16 KB; plain prose with one finding, or a finding in every sentence;
answers non-streamed or streamed (``targets.STREAM_TOKENS`` tokens); at several concurrencies;
against the bare proxy, the gateway with authentication only and the gateway with every guard
(caps, rate limits, budgets in the ledger, PII redaction in and out, the injection flag, the tool
guard, the audit record with its full text encrypted). nginx answers. Every target is measured
in the same run, rounds interleaved, medians kept; each measurement also reads the target's CPU
time from /proc, so the table gives CPU microseconds per request and, between sizes, per KB.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.bench import cpu, stores, targets, wrk
from serving.bench.run import median_cell

# Sentences of ordinary business prose, none holding personal data.
_PROSE = (
    "The committee reviewed the quarterly figures and agreed to extend the pilot programme.",
    "Our engineers replaced the cooling units in the second hall during the maintenance window.",
    "Please summarise the attached minutes and list the decisions that still need an owner.",
    "The supplier confirmed that the spare parts will arrive before the end of the month.",
    "We expect the migration to finish on schedule if the test environment stays available.",
    "Several customers asked whether the new pricing applies to contracts signed last year.",
    "The legal team suggested clearer wording for the liability clause in section four.",
    "Training sessions for the support staff are planned for the first two weeks of spring.",
)
# One finding of each kind the detector knows, each inside a sentence.
_FINDINGS = (
    "Write to maria.keller@example.org with the revised schedule.",
    "Her direct line is +44 20 7946 0958 if anything is unclear.",
    "The refund goes to FR76 3000 6000 0112 3456 7890 189 as agreed.",
    "The card on file, 4111 1111 1111 1111, was charged twice.",
    "The failing host answered from 10.20.30.40 during the incident.",
    "His social security number 078-05-1120 appears on the form.",
)
SIZES_KB = (0.1, 4.0, 16.0)
TARGETS = ("bare proxy", "gateway, auth only", "gateway, every guard")


def prompt(size_kb: float, dense: bool) -> str:
    """About ``size_kb`` KB of prose: one finding in the middle (plain), or a finding after
    every sentence (dense). The 0.1 KB prompt is one sentence with one finding either way."""
    if size_kb <= 0.1:
        return "Please draft a short reply to maria.keller@example.org about the delay."
    want = int(size_kb * 1024)
    parts: list[str] = []
    i = 0
    while sum(len(p) + 1 for p in parts) < want:
        parts.append(_PROSE[i % len(_PROSE)])
        if dense:
            parts.append(_FINDINGS[i % len(_FINDINGS)])
        i += 1
    if not dense:
        parts.insert(len(parts) // 2, _FINDINGS[0])
    return " ".join(parts)[:want]


@dataclass(frozen=True)
class Case:
    size_kb: float
    dense: bool
    stream: bool

    @property
    def name(self) -> str:
        size = "0.1 KB" if self.size_kb <= 0.1 else f"{self.size_kb:g} KB"
        kind = "" if self.size_kb <= 0.1 else (", dense" if self.dense else ", plain")
        return f"{size}{kind}{', streamed' if self.stream else ''}"

    def body(self) -> str:
        request: dict[str, object] = {
            "model": "demo-stream" if self.stream else "demo-chat",
            "max_tokens": targets.STREAM_TOKENS if self.stream else 16,
            "messages": [{"role": "user", "content": prompt(self.size_kb, self.dense)}]}
        if self.stream:
            request["stream"] = True
        return json.dumps(request)


def cases(sizes: tuple[float, ...] = SIZES_KB, streams: tuple[bool, ...] = (False, True)
          ) -> list[Case]:
    out = []
    for stream in streams:
        for size in sizes:
            out += [Case(size, False, stream)] if size <= 0.1 else \
                [Case(size, False, stream), Case(size, True, stream)]
    return out


@dataclass
class Cell:
    case: str
    size_kb: float
    dense: bool
    stream: bool
    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float


def _run(target: targets.Target, body: str, c: int, seconds: float
         ) -> tuple[wrk.Result, float]:
    before = cpu.tree_seconds(target.pid)
    result = wrk.run(target.url + "/v1/chat/completions", body, c, seconds, target.key)
    used = cpu.tree_seconds(target.pid) - before
    return result, used / max(result.requests, 1) * 1e6


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def running_targets(models_dir: Path, workers: int = 1) -> Iterator[dict[str, targets.Target]]:
    with tempfile.TemporaryDirectory(prefix="enclave-bench-matrix-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        upstream, streams = stack.enter_context(targets.nginx_pair(root / "nginx"))
        models = targets.bench_models(root, {"demo-chat": _port(upstream)}, models_dir,
                                      {"demo-stream": ("demo-chat", _port(streams))})
        found = {
            TARGETS[0]: stack.enter_context(targets.serve_bare(root, upstream, streams)),
            TARGETS[1]: stack.enter_context(targets.serve_gateway(
                root / "gw-auth", models, policies=targets.AUTH_ONLY_POLICIES)),
            TARGETS[2]: stack.enter_context(targets.serve_gateway(
                root / "gw-guarded", models, policies=targets.EVERY_GUARD_POLICIES)),
        }
        if workers > 1:
            # Workers share rate limits through Redis; the one-worker gateway beside them
            # does too, so that the two differ only in their number of processes.
            redis = stores.RedisServer(root / "redis").start()
            stack.callback(redis.stop)
            for n in (1, workers):
                found[f"every guard + Redis, {n} worker{'s' if n > 1 else ''}"] = \
                    stack.enter_context(targets.serve_gateway(
                        root / f"gw-redis-{n}", models, redis_url=redis.url,
                        policies=targets.EVERY_GUARD_POLICIES, workers=n))
        yield found


def measure(found: dict[str, targets.Target], plan: list[Case], concurrencies: list[int],
            seconds: float, rounds: int, say: Callable[[str], None]) -> list[Cell]:
    cells = []
    for case in plan:
        body = case.body()
        for c in concurrencies:
            for target in found.values():  # warm-up: connections, caches
                wrk.run(target.url + "/v1/chat/completions", body, c, 1, target.key)
            raw: dict[str, list[tuple[wrk.Result, float]]] = {name: [] for name in found}
            for r in range(rounds):
                for name, target in found.items():
                    say(f"{case.name}, c={c}, round {r + 1}/{rounds}: {name}")
                    raw[name].append(_run(target, body, c, seconds))
            for name, runs in raw.items():
                m = median_cell(name, c, [w for w, _ in runs])
                cells.append(Cell(case.name, case.size_kb, case.dense, case.stream, name, c,
                                  m.rps, m.p50_ms, m.p99_ms, m.errors,
                                  statistics.median(u for _, u in runs)))
    return cells


def per_kb(cells: list[Cell], target: str, dense: bool, stream: bool = False) -> float | None:
    """CPU microseconds per extra KB of prompt: the slope from the shortest to the longest
    prompt (median over concurrencies)."""
    slopes = []
    for c in sorted({x.concurrency for x in cells}):
        row = sorted((x for x in cells if x.target == target and x.concurrency == c
                      and x.stream == stream and (x.dense == dense or x.size_kb <= 0.1)),
                     key=lambda x: x.size_kb)
        if len(row) >= 2 and row[-1].size_kb > row[0].size_kb:
            slopes.append((row[-1].cpu_us_per_request - row[0].cpu_us_per_request)
                          / (row[-1].size_kb - row[0].size_kb))
    return statistics.median(slopes) if slopes else None


def per_chunk(cells: list[Cell], target: str) -> float | None:
    """CPU microseconds per streamed event: streamed minus non-streamed, at the shortest
    prompt, over the events of the canned stream (median over concurrencies)."""
    values = []
    for c in sorted({x.concurrency for x in cells}):
        pair = {x.stream: x for x in cells if x.target == target and x.concurrency == c
                and x.size_kb <= 0.1}
        if True in pair and False in pair:
            values.append((pair[True].cpu_us_per_request - pair[False].cpu_us_per_request)
                          / (targets.STREAM_TOKENS + 2))
    return statistics.median(values) if values else None


def ratio(cells: list[Cell], case: str, c: int, target: str, base: str = TARGETS[0]
          ) -> float | None:
    by = {(x.case, x.concurrency, x.target): x for x in cells}
    a, b = by.get((case, c, target)), by.get((case, c, base))
    return a.rps / b.rps if a is not None and b is not None and b.rps else None


# The targets: (case, the least ratio to the bare proxy), c=16, every guard on.
RATIO_TARGETS = (("0.1 KB", 0.6), ("4 KB, plain", 0.5), ("4 KB, dense", 0.4),
                 ("16 KB, plain", 0.35), ("16 KB, dense", 0.35))
PER_KB_TARGETS = {False: 40.0, True: 80.0}
PER_CHUNK_TARGET = 20.0


def to_json(cells: list[Cell]) -> list[dict[str, object]]:
    return [asdict(c) for c in cells]
