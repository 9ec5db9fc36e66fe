"""Running an evaluation set against a model version: every case's request sent (a few at a
time), its answer checked, the results counted per kind of check, and the gate a rollout
applies to the counts.

Where requests go is a ``Target``: ``ReplicaTarget`` posts straight to a version's engines,
past the gateway (an evaluation measures the model, not a client's policy, and must reach a
version that takes no traffic yet); tests give their own.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from serving.contract import PATHS
from serving.evals.checks import NO_ANSWER, CheckResult, answer_text, cosine, embeddings, evaluate
from serving.evals.sets import CHECK_KINDS, Case, CheckKind, EvalSet

# Pass rates are ratios of small counts: compared with this much slack, 0.85 is not below
# 0.90 - 0.05.
_EPSILON = 1e-9


class Target(Protocol):
    async def post(self, endpoint: str,
                   body: dict[str, Any]) -> tuple[int, dict[str, Any] | None, float]:
        """Send ``body`` to ``endpoint`` ("chat", "completions", "embeddings"); return the
        HTTP status (``NO_ANSWER`` when none came), the JSON answer (None when not an object)
        and the latency in seconds."""
        ...


class ReplicaTarget:
    """A version's engines, in turn. vLLM serves every version of a model under the model's
    name, so ``served_model`` is the model's name."""

    def __init__(self, client: httpx.AsyncClient, base_urls: list[str],
                 served_model: str) -> None:
        if not base_urls:
            raise ValueError("a target needs at least one engine URL")
        self.client = client
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.served_model = served_model
        self._next = itertools.cycle(self.base_urls)

    async def post(self, endpoint: str,
                   body: dict[str, Any]) -> tuple[int, dict[str, Any] | None, float]:
        url = next(self._next) + PATHS[endpoint]
        start = time.perf_counter()
        try:
            response = await self.client.post(url, json={**body, "model": self.served_model})
        except httpx.HTTPError:
            return NO_ANSWER, None, time.perf_counter() - start
        latency = time.perf_counter() - start
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        return response.status_code, parsed if isinstance(parsed, dict) else None, latency


class ByModel:
    """Embedding models by name, one of them the default: a ``similar`` check that names its
    model (``similar.model``) is sent there, the others to the default."""

    def __init__(self, targets: dict[str, Target], default: str | None) -> None:
        self.targets = targets
        self.default = default

    async def post(self, endpoint: str,
                   body: dict[str, Any]) -> tuple[int, dict[str, Any] | None, float]:
        name = body.get("model") or self.default
        target = self.targets.get(name) if isinstance(name, str) else None
        if target is None:
            return 404, None, 0.0
        return await target.post(endpoint, body)


@dataclass(slots=True)
class Count:
    passed: int = 0
    total: int = 0

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class CaseResult:
    id: str
    passed: bool
    status: int
    latency_ms: float
    checks: tuple[CheckResult, ...]

    @property
    def failures(self) -> list[str]:
        """``kind: reason`` of each failed check."""
        return [f"{c.kind}: {c.reason}" for c in self.checks if not c.passed]


@dataclass(slots=True)
class Report:
    set_name: str
    digest: str
    label: str  # what ran it: MODEL@VERSION
    checks: dict[CheckKind, Count] = field(
        default_factory=lambda: {k: Count() for k in CHECK_KINDS})
    results: list[CaseResult] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.cases if self.cases else 0.0

    def add(self, result: CaseResult) -> None:
        self.results.append(result)
        for check in result.checks:
            count = self.checks[check.kind]
            count.total += 1
            count.passed += check.passed

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_name, "digest": self.digest, "version": self.label,
            "cases": self.cases, "passed": self.passed, "pass_rate": self.pass_rate,
            "checks": {k: {"passed": c.passed, "total": c.total}
                       for k, c in self.checks.items()},
            "results": [{"id": r.id, "passed": r.passed, "status": r.status,
                         "latency_ms": round(r.latency_ms, 1), "failures": r.failures}
                        for r in self.results],
        }


async def run_set(eval_set: EvalSet, target: Target, embedder: Target | None = None,
                  concurrency: int = 4, label: str = "") -> Report:
    """Every case of ``eval_set`` against ``target``, at most ``concurrency`` at a time;
    ``embedder`` embeds answers and references for ``similar`` checks."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> CaseResult:
        async with gate:
            return await _run_case(case, target, embedder)

    results = await asyncio.gather(*(one(c) for c in eval_set.cases))
    report = Report(set_name=eval_set.name, digest=eval_set.digest, label=label)
    for result in results:  # in the set's order, whatever order they finished in
        report.add(result)
    return report


async def _run_case(case: Case, target: Target, embedder: Target | None) -> CaseResult:
    status, body, latency = await target.post(case.endpoint, dict(case.request))
    text = answer_text(case.endpoint, body)
    similarity, why = None, "no embedding model"
    if status == 200 and case.checks.similar is not None:
        similarity, why = await _similarity(case, body, text, target, embedder)
    checks = evaluate(case, status, text, latency, similarity, why)
    return CaseResult(id=case.id, passed=all(c.passed for c in checks), status=status,
                      latency_ms=latency * 1000, checks=tuple(checks))


async def _similarity(case: Case, body: dict[str, Any] | None, text: str | None,
                      target: Target, embedder: Target | None) -> tuple[float | None, str]:
    """The cosine similarity of the answer's embedding to the reference's, or why there is
    none. An embeddings case's answer is its own vector, its reference embedded by the same
    model unless ``similar.model`` names another; a text answer and its reference are embedded
    together by the embedding model."""
    similar = case.checks.similar
    assert similar is not None
    extra = {"model": similar.model} if similar.model else {}
    if case.endpoint == "embeddings":
        answer = embeddings(body)
        if answer is None:
            return None, "no embedding in the response"
        by = embedder if similar.model else target
        if by is None:
            return None, "no embedding model"
        vectors = await _embed(by, [similar.text], extra)
        if isinstance(vectors, str):
            return None, vectors
        pair = [answer[0], vectors[0]]
    else:
        if text is None:
            return None, "no answer text in the response"
        if embedder is None:
            return None, "no embedding model"
        vectors = await _embed(embedder, [text, similar.text], extra)
        if isinstance(vectors, str):
            return None, vectors
        pair = vectors
    value = cosine(pair[0], pair[1])
    return (None, "the embeddings differ in size") if value is None else (value, "")


async def _embed(by: Target, inputs: list[str],
                 extra: dict[str, Any]) -> list[list[float]] | str:
    """The embeddings of ``inputs``, or why not."""
    status, body, _ = await by.post("embeddings", {"input": inputs, **extra})
    if status != 200:
        return f"the embedding model answered HTTP {status}"
    vectors = embeddings(body)
    if vectors is None or len(vectors) != len(inputs):
        return "no embedding in the embedding model's response"
    return vectors


def gate(candidate: Report, baseline: Report | None, min_pass_rate: float,
         max_drop: float) -> tuple[bool, str]:
    """Whether ``candidate`` may go on: its pass rate at least ``min_pass_rate`` and, against
    the stable version's report on the same set, at most ``max_drop`` lower. The reason names
    the numbers either way."""
    rate = candidate.pass_rate
    if rate + _EPSILON < min_pass_rate:
        return False, f"pass rate {rate:.2f} < {min_pass_rate:.2f} required"
    if baseline is None:
        return True, f"pass rate {rate:.2f} ≥ {min_pass_rate:.2f} required"
    if baseline.digest != candidate.digest:
        return False, ("the reports are of different sets (digests "
                       f"{candidate.digest[:12]} and {baseline.digest[:12]}): not comparable")
    stable = baseline.pass_rate
    if rate + max_drop + _EPSILON < stable:
        return False, (f"pass rate {rate:.2f} is {stable - rate:.2f} below the stable "
                       f"version's {stable:.2f} (margin {max_drop:.2f})")
    return True, (f"pass rate {rate:.2f} ≥ {min_pass_rate:.2f} required, stable version's "
                  f"{stable:.2f} (margin {max_drop:.2f})")
