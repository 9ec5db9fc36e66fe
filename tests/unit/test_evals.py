"""Evaluation sets: loading (digest, errors that name file:line and field), each check, the
runner against in-test targets, the rollout gate, and `enclave eval` against a stand-in engine."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from serving.cli.main import cli
from serving.evals.checks import (
    EXCERPT_CHARS,
    CheckResult,
    answer_text,
    cosine,
    embeddings,
    evaluate,
)
from serving.evals.runner import ByModel, CaseResult, ReplicaTarget, Report, gate, run_set
from serving.evals.sets import Case, EvalSet, EvalSetError, load_set
from tests.support import REPO, copy_manifests, free_port

pytestmark = pytest.mark.anyio

Answer = tuple[int, dict[str, Any] | None, float]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def line(id: str = "a", **fields: Any) -> str:
    case: dict[str, Any] = {"id": id, "request": CHAT, "checks": {"regex": r"\S"}}
    case.update(fields)
    return json.dumps(case)


def write_set(root: Path, lines: list[str], name: str = "s", file: str = "a.jsonl") -> Path:
    folder = root / "evals" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text("\n".join(lines) + "\n")
    return root / "evals"


def case(**fields: Any) -> Case:
    data: dict[str, Any] = {"id": "c", "request": CHAT, "checks": {"regex": r"\S"}}
    data.update(fields)
    return Case.model_validate(data)


def chat_answer(text: str | None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def embedding_answer(*vectors: list[float]) -> dict[str, Any]:
    return {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}


class FakeTarget:
    """Answers from ``answer(endpoint, body)`` after ``delay`` seconds; records the requests
    and the most in flight at once."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], Answer],
                 delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def post(self, endpoint: str, body: dict[str, Any]) -> Answer:
        self.requests.append((endpoint, body))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return self.answer(endpoint, body)
        finally:
            self.in_flight -= 1


def says(text: str, status: int = 200, latency: float = 0.01) -> FakeTarget:
    return FakeTarget(lambda _e, _b: (status, chat_answer(text), latency))


def eval_set(*cases: Case, digest: str = "d" * 64) -> EvalSet:
    return EvalSet(name="s", digest=digest, files=(), cases=cases)


# Loading


def test_the_repository_demo_set_loads() -> None:
    loaded = load_set(REPO / "evals", "demo-chat")
    assert len(loaded.cases) >= 6 and all(c.endpoint == "chat" for c in loaded.cases)
    assert len(loaded.digest) == 64 and loaded.files[0].name == "basic.jsonl"
    assert all(c.request.get("stream") is not True for c in loaded.cases)
    embed = load_set(REPO / "evals", "minilm-embed")
    assert {c.endpoint for c in embed.cases} == {"embeddings"}
    assert all(c.checks.similar is not None for c in embed.cases)


def test_the_digest_changes_when_a_file_is_edited_or_renamed(tmp_path: Path) -> None:
    evals = write_set(tmp_path, [line("a"), line("b")])
    first = load_set(evals, "s").digest
    assert load_set(evals, "s").digest == first
    write_set(tmp_path, [line("a"), line("c")])
    edited = load_set(evals, "s").digest
    (evals / "s" / "a.jsonl").rename(evals / "s" / "b.jsonl")
    renamed = load_set(evals, "s").digest
    assert len({first, edited, renamed}) == 3


def test_cases_come_from_every_file_in_name_order_and_blank_lines_are_skipped(
        tmp_path: Path) -> None:
    evals = write_set(tmp_path, ["", line("z1"), "   "], file="b.jsonl")
    write_set(tmp_path, [line("a1"), "", line("a2")], file="a.jsonl")
    assert [c.id for c in load_set(evals, "s").cases] == ["a1", "a2", "z1"]


@pytest.mark.parametrize(("bad", "field", "says_"), [
    ('{"id": "x",', "", "not valid JSON"),
    ('["x"]', "", "expected a JSON object"),
    (line("x", colour="red"), "colour", "Extra inputs"),
    (line("x", checks={"regex": r"\S", "fuzzy": 1}), "checks.fuzzy", "Extra inputs"),
    (line("x", checks={}), "checks", "at least one"),
    (line("x", checks={"regex": "(unclosed"}), "checks.regex",
     "not a valid regular expression"),
    (line("x", checks={"json_schema": {"type": "nope"}}), "checks.json_schema",
     "not a valid JSON schema"),
    (line("x", checks={"similar": {"text": "t", "min": 1.5}}), "checks.similar.min", "less"),
    (line("x", endpoint="images"), "endpoint", "Input should be"),
    (line("x", request={**CHAT, "frobnicate": True}), "request.frobnicate",
     "gateway would refuse"),
    (line("x", request={"messages": []}), "request.messages", "gateway would refuse"),
    (line("x", request={**CHAT, "stream": True}), "request.stream", "must not be true"),
    (line("x", request={**CHAT, "model": "demo-chat"}), "request.model", "leave it out"),
    (line("x", checks={"json_schema": {"type": "object"}}), "checks.json_schema",
     "response_format"),
    (line("x", request={**CHAT, "response_format": {"type": "text"}},
          checks={"json_schema": {"type": "object"}}), "checks.json_schema",
     "json_object"),
    (line("x", endpoint="embeddings", request={"input": "t"}), "checks.regex",
     "only similar and max_latency_ms"),
])
def test_a_bad_case_is_refused_with_its_file_line_and_field(
        tmp_path: Path, bad: str, field: str, says_: str) -> None:
    evals = write_set(tmp_path, [line("ok"), "", bad])
    with pytest.raises(EvalSetError) as caught:
        load_set(evals, "s")
    message = str(caught.value)
    assert message.startswith(f"evals/s/a.jsonl:3: {field}"), message
    assert says_ in message, message


def test_a_repeated_id_names_both_lines(tmp_path: Path) -> None:
    evals = write_set(tmp_path, [line("a"), line("a")])
    with pytest.raises(EvalSetError, match=r"a\.jsonl:2: id: 'a' repeats .*a\.jsonl:1"):
        load_set(evals, "s")


def test_a_json_schema_check_with_a_json_response_format_loads(tmp_path: Path) -> None:
    formats: list[dict[str, Any]] = [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object"}}}},
        {"structured_outputs": {"json": {"type": "object"}}}]
    evals = write_set(tmp_path, [
        line(f"f{i}", request={**CHAT, **fmt}, checks={"json_schema": {"type": "object"}})
        for i, fmt in enumerate(formats)])
    assert len(load_set(evals, "s").cases) == 3


@pytest.mark.parametrize("name", ["../evals", "s/../s", "/etc", ".hidden", "", "UPPER", "a b"])
def test_a_set_name_is_never_a_path(tmp_path: Path, name: str) -> None:
    evals = write_set(tmp_path, [line()])
    with pytest.raises(EvalSetError, match="not an eval set name"):
        load_set(evals, name)


def test_a_missing_or_empty_set_is_an_error(tmp_path: Path) -> None:
    evals = write_set(tmp_path, [""])
    with pytest.raises(EvalSetError, match="no cases"):
        load_set(evals, "s")
    with pytest.raises(EvalSetError, match="no eval set 'other'"):
        load_set(evals, "other")


# Checks


@pytest.mark.parametrize(("checks", "text", "passed"), [
    ({"exact": "Paris"}, " Paris\n", True),
    ({"exact": "Paris"}, "Lyon", False),
    ({"regex": r"^\d+$"}, "42", True),
    ({"regex": r"^\d+$"}, "forty-two", False),
    ({"max_latency_ms": 500}, "x", True),
    ({"max_latency_ms": 100}, "x", False),
])
def test_text_and_latency_checks(checks: dict[str, Any], text: str, passed: bool) -> None:
    [result] = evaluate(case(checks=checks), 200, text, latency_s=0.2)
    assert result.passed is passed, result.reason


def test_a_json_schema_check_parses_and_validates_the_answer() -> None:
    c = case(request={**CHAT, "response_format": {"type": "json_object"}},
             checks={"json_schema": {"type": "object", "required": ["age"],
                                     "properties": {"age": {"type": "integer"}}}})
    assert evaluate(c, 200, '{"age": 3}', 0.1)[0].passed
    [not_json] = evaluate(c, 200, "{age: 3", 0.1)
    assert not not_json.passed and "not JSON" in not_json.reason
    [wrong] = evaluate(c, 200, '{"age": "secret-value"}', 0.1)
    assert not wrong.passed and "$.age" in wrong.reason and "type" in wrong.reason
    assert "secret-value" not in wrong.reason  # the rule, never the answer's value


def test_a_similar_check_compares_with_the_threshold() -> None:
    c = case(checks={"similar": {"text": "t", "min": 0.8}})
    assert evaluate(c, 200, "x", 0.1, similarity=0.9)[0].passed
    assert not evaluate(c, 200, "x", 0.1, similarity=0.5)[0].passed
    [none] = evaluate(c, 200, "x", 0.1)
    assert not none.passed and none.reason == "no embedding model"


def test_a_non_200_answer_fails_every_check_with_its_status() -> None:
    c = case(checks={"regex": ".", "max_latency_ms": 1000, "exact": "x"})
    results = evaluate(c, 503, None, 0.01)
    assert [r.kind for r in results] == ["exact", "regex", "max_latency"]
    assert all(not r.passed and r.reason == "HTTP 503" for r in results)


def test_reasons_quote_at_most_a_short_excerpt_of_the_answer() -> None:
    answer = "private " * 200
    for checks in ({"regex": "^nothing$"}, {"exact": "other"}):
        c = case(request={**CHAT, "response_format": {"type": "json_object"}}, checks=checks)
        [result] = evaluate(c, 200, answer, 0.1)
        assert not result.passed
        assert answer not in result.reason and result.reason.count("private") <= EXCERPT_CHARS / 8


def test_answers_are_read_from_each_endpoints_shape() -> None:
    assert answer_text("chat", chat_answer("hi")) == "hi"
    assert answer_text("chat", chat_answer(None)) is None
    assert answer_text("completions", {"choices": [{"text": "yo"}]}) == "yo"
    assert answer_text("chat", {"error": "x"}) is None
    assert embeddings({"data": [{"index": 1, "embedding": [2]}, {"index": 0, "embedding": [1]}]}
                      ) == [[1.0], [2.0]]
    assert embeddings({"data": [{"index": 0, "embedding": "AAAA"}]}) is None
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 0], [1, 0, 0]) is None
    assert cosine([0, 0], [1, 0]) == 0.0


# Runner


async def test_cases_run_with_bounded_concurrency_and_report_in_set_order() -> None:
    target = FakeTarget(lambda _e, b: (200, chat_answer(b["messages"][0]["content"]), 0.01),
                        delay=0.02)
    cases = [case(id=f"c{i}", request={**CHAT, "messages": [{"role": "user", "content": str(i)}]},
                  checks={"regex": r"^[0-4]$"}) for i in range(8)]
    report = await run_set(eval_set(*cases), target, concurrency=3, label="m@v1")
    assert target.most_in_flight == 3
    assert [r.id for r in report.results] == [f"c{i}" for i in range(8)]
    assert (report.cases, report.passed, report.pass_rate) == (8, 5, 5 / 8)
    assert (report.checks["regex"].passed, report.checks["regex"].total) == (5, 8)
    assert report.checks["exact"].total == 0
    assert json.loads(json.dumps(report.as_dict()))["version"] == "m@v1"


async def test_a_failed_request_fails_every_check_of_its_case() -> None:
    target = FakeTarget(lambda _e, b: (500, None, 0.01) if b["max_tokens"] == 1
                        else (200, chat_answer("ok"), 0.01))
    bad = case(id="bad", request={**CHAT, "max_tokens": 1},
               checks={"regex": ".", "max_latency_ms": 1000})
    report = await run_set(eval_set(case(id="good"), bad), target)
    assert [r.passed for r in report.results] == [True, False]
    assert report.results[1].failures == ["regex: HTTP 500", "max_latency: HTTP 500"]
    assert report.checks["max_latency"].passed == 0


def vectors(table: dict[str, list[float]]) -> FakeTarget:
    """An embedding model that knows the vectors of a few texts."""

    def answer(_endpoint: str, body: dict[str, Any]) -> Answer:
        given = body["input"]
        inputs = given if isinstance(given, list) else [given]
        return 200, embedding_answer(*(table[t] for t in inputs)), 0.01

    return FakeTarget(answer)


async def test_similar_checks_embed_the_answer_and_the_reference_together() -> None:
    embedder = vectors({"cat": [1, 0], "kitten": [0.9, 0.1], "car": [0, 1]})
    near = case(id="near", checks={"similar": {"text": "kitten", "min": 0.9}})
    far = case(id="far", checks={"similar": {"text": "car", "min": 0.9}})
    report = await run_set(eval_set(near, far), says("cat"), embedder)
    assert [r.passed for r in report.results] == [True, False]
    assert report.results[1].failures[0].startswith("similar: similarity 0.000 < 0.900")
    assert ("embeddings", {"input": ["cat", "kitten"]}) in embedder.requests
    without = await run_set(eval_set(near), says("cat"))
    assert without.results[0].failures == ["similar: no embedding model"]


async def test_an_embeddings_case_compares_its_vector_with_the_same_models_reference() -> None:
    target = vectors({"query": [1, 1], "reference": [1, 1]})
    c = case(endpoint="embeddings", request={"input": "query"},
             checks={"similar": {"text": "reference", "min": 0.99}})
    report = await run_set(eval_set(c), target)
    assert report.passed == 1 and len(target.requests) == 2


async def test_a_named_embedding_model_is_asked_by_name() -> None:
    default, named = vectors({"a": [1, 0], "b": [1, 0]}), vectors({"a": [1, 0], "b": [0, 1]})
    embedder = ByModel({"e1": default, "e2": named}, default="e1")
    c1 = case(id="1", checks={"similar": {"text": "b", "min": 0.5}})
    c2 = case(id="2", checks={"similar": {"text": "b", "min": 0.5, "model": "e2"}})
    report = await run_set(eval_set(c1, c2), says("a"), embedder)
    assert [r.passed for r in report.results] == [True, False]
    assert len(default.requests) == len(named.requests) == 1


async def test_the_replica_target_posts_to_each_engine_in_turn_as_the_models_name() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        seen.append((str(request.url), json.loads(request.content)))
        return httpx.Response(200, json=chat_answer("hi"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        target = ReplicaTarget(client, ["http://e1:1/", "http://e2:2", "http://down:3"], "m")
        answers = [await target.post(e, {"x": 1}) for e in ("chat", "completions", "embeddings")]
    assert [u for u, _ in seen] == ["http://e1:1/v1/chat/completions",
                                    "http://e2:2/v1/completions"]
    assert all(body == {"x": 1, "model": "m"} for _, body in seen)
    assert answers[0][:2] == (200, chat_answer("hi"))
    assert answers[2][:2] == (599, None)


# Gate


def report_with(passed: int, cases: int, digest: str = "d" * 64) -> Report:
    report = Report(set_name="s", digest=digest, label="m@v")
    for i in range(cases):
        ok = i < passed
        report.add(CaseResult(id=str(i), passed=ok, status=200, latency_ms=1.0,
                              checks=(CheckResult("regex", ok, ""),)))
    return report


def test_the_gate_names_the_numbers() -> None:
    assert gate(report_with(2, 5), None, 0.9, 0.05) == (False, "pass rate 0.40 < 0.90 required")
    ok, reason = gate(report_with(19, 20), None, 0.9, 0.05)
    assert ok and "0.95" in reason
    assert gate(report_with(16, 20), report_with(19, 20), 0.5, 0.05) == (
        False, "pass rate 0.80 is 0.15 below the stable version's 0.95 (margin 0.05)")
    ok, _ = gate(report_with(17, 20), report_with(18, 20), 0.85, 0.05)  # 0.85 = 0.90 - 0.05
    assert ok
    ok, reason = gate(report_with(5, 5), report_with(5, 5, digest="e" * 64), 0.9, 0.05)
    assert not ok and "different sets" in reason


# The command


@pytest.fixture
def engine() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A stand-in engine on loopback: healthy, answering chat requests with "hello"."""
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, data: dict[str, Any]) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._send(200, {})

        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self._send(200, chat_answer("hello"))

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], bodies
    finally:
        server.shutdown()
        server.server_close()


def run_cli(tmp_path: Path, port: int, *args: str) -> Any:
    env = {"ENCLAVE_MODELS_DIR": str(copy_manifests(tmp_path / "models", {"demo-chat": port})),
           "ENCLAVE_EVALS_DIR": str(REPO / "evals"), "ENCLAVE_ENGINE_HOST": "127.0.0.1"}
    return CliRunner().invoke(cli, list(args), env=env)


def test_eval_run_prints_pass_rates_per_check(
        tmp_path: Path, engine: tuple[int, list[dict[str, Any]]]) -> None:
    port, bodies = engine
    result = run_cli(tmp_path, port, "eval", "run", "demo-chat@v1", "demo-chat")
    assert result.exit_code == 0, result.output
    assert "demo-chat@v1" in result.output and "regex" in result.output
    assert "100%" in result.output
    assert bodies and all(b["model"] == "demo-chat" for b in bodies)
    as_json = run_cli(tmp_path, port, "eval", "run", "demo-chat@v1", "demo-chat", "--json")
    [report] = json.loads(as_json.stdout)
    assert report["pass_rate"] == 1.0 and report["version"] == "demo-chat@v1"


def test_eval_run_says_which_engine_it_cannot_reach(tmp_path: Path) -> None:
    port = free_port()
    result = run_cli(tmp_path, port, "eval", "run", "demo-chat@v1", "demo-chat")
    assert result.exit_code == 1
    assert f"cannot reach demo-chat@v1 at http://127.0.0.1:{port}" in result.stderr


def test_eval_run_refuses_an_unknown_version(tmp_path: Path) -> None:
    result = run_cli(tmp_path, free_port(), "eval", "run", "demo-chat@v9", "demo-chat")
    assert result.exit_code == 1 and "has no version 'v9'" in result.stderr


def test_eval_run_refuses_a_set_made_for_another_task(tmp_path: Path) -> None:
    result = run_cli(tmp_path, free_port(), "eval", "run", "demo-chat@v1", "minilm-embed")
    assert result.exit_code == 1
    assert "has embeddings cases; demo-chat is a chat model" in result.stderr


def test_eval_list_shows_the_sets(tmp_path: Path) -> None:
    result = run_cli(tmp_path, free_port(), "eval", "list")
    assert result.exit_code == 0, result.output
    assert "demo-chat" in result.output and "minilm-embed" in result.output
