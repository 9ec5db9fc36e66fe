"""A case's checks against one answer: pure functions, given what came back (status, text,
latency, and the similarity the runner measured), no I/O.

Reasons are short and never hold an answer whole: answers may carry personal data, and reports
are printed, kept and shared. At most ``EXCERPT_CHARS`` characters of an answer are quoted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import best_match

from serving.evals.sets import Case, CheckKind

EXCERPT_CHARS = 80
NO_ANSWER = 599  # the status a target reports when no HTTP answer came back at all


@dataclass(frozen=True, slots=True)
class CheckResult:
    kind: CheckKind
    passed: bool
    reason: str


def excerpt(text: str) -> str:
    """``text`` quoted, cut to ``EXCERPT_CHARS`` characters."""
    return json.dumps(_cut(text), ensure_ascii=False)


def _cut(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"


def answer_text(endpoint: str, body: dict[str, Any] | None) -> str | None:
    """The first choice's text (chat: ``message.content``; completions: ``text``); None when
    the answer has none (an embedding, a malformed body, a tool call without content)."""
    if body is None or endpoint not in ("chat", "completions"):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    first = choices[0]
    if endpoint == "chat":
        message = first.get("message")
        value = message.get("content") if isinstance(message, dict) else None
    else:
        value = first.get("text")
    return value if isinstance(value, str) else None


def embeddings(body: dict[str, Any] | None) -> list[list[float]] | None:
    """The vectors of an embeddings answer, in input order; None unless every item is a list
    of numbers (``encoding_format: base64`` answers are not read)."""
    data = body.get("data") if body is not None else None
    if not isinstance(data, list) or not data:
        return None
    items = sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0))
    vectors: list[list[float]] = []
    for item in items:
        vector = item.get("embedding")
        if not isinstance(vector, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            return None
        vectors.append([float(x) for x in vector])
    return vectors if len(vectors) == len(data) else None


def cosine(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cosine similarity; None when the vectors cannot be compared (sizes differ, empty). A
    zero vector is similar to nothing (0.0)."""
    if len(a) != len(b) or not a:
        return None
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    if norm == 0:
        return 0.0
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / norm


def evaluate(case: Case, status: int, text: str | None, latency_s: float,
             similarity: float | None = None,
             no_similarity: str = "no embedding model") -> list[CheckResult]:
    """Each of ``case``'s checks, in ``CHECK_KINDS`` order. ``similarity`` is what the runner
    measured for a ``similar`` check; when it is None, ``no_similarity`` says why."""
    kinds = case.checks.kinds()
    if status != 200:
        reason = f"HTTP {status}" + (" (no answer)" if status == NO_ANSWER else "")
        return [CheckResult(kind, False, reason) for kind in kinds]
    checks = case.checks
    results: list[CheckResult] = []
    for kind in kinds:
        if kind == "max_latency":
            assert checks.max_latency_ms is not None
            took = latency_s * 1000
            ok = took <= checks.max_latency_ms
            results.append(CheckResult(kind, ok, f"{took:.0f} ms {'≤' if ok else '>'} "
                                                 f"{checks.max_latency_ms:.0f} ms"))
        elif kind == "similar":
            assert checks.similar is not None
            results.append(_similar(similarity, checks.similar.min, no_similarity))
        elif text is None:
            results.append(CheckResult(kind, False, "no answer text in the response"))
        elif kind == "exact":
            assert checks.exact is not None
            ok = text.strip() == checks.exact.strip()
            results.append(CheckResult(kind, ok, "the expected text" if ok
                                       else f"not the expected text: got {excerpt(text)}"))
        elif kind == "regex":
            assert checks.pattern is not None
            ok = checks.pattern.search(text) is not None
            results.append(CheckResult(kind, ok, f"{'matches' if ok else 'no match for'} "
                                       f"/{_cut(checks.pattern.pattern)}/"
                                       + ("" if ok else f" in {excerpt(text)}")))
        else:
            results.append(_json_schema(case, text))
    return results


def _similar(similarity: float | None, minimum: float, no_similarity: str) -> CheckResult:
    if similarity is None:
        return CheckResult("similar", False, no_similarity)
    ok = similarity >= minimum
    return CheckResult("similar", ok,
                       f"similarity {similarity:.3f} {'≥' if ok else '<'} {minimum:.3f}")


def _json_schema(case: Case, text: str) -> CheckResult:
    validator = case.checks.validator
    assert validator is not None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return CheckResult("json_schema", False,
                           f"not JSON ({exc.msg}, column {exc.colno}): {excerpt(text)}")
    error = best_match(validator.iter_errors(value))
    if error is None:
        return CheckResult("json_schema", True, "valid against the schema")
    # The rule and where it failed, not the offending value (it is part of the answer).
    rule = error.validator_value
    shown = f" {json.dumps(rule)[:EXCERPT_CHARS]}" if isinstance(
        rule, str | int | float | bool) else ""
    return CheckResult("json_schema", False,
                       f"fails the schema's {error.validator}{shown} at {error.json_path}")
