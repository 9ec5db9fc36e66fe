"""The request contract against the real engines: every text field reaches the engine redacted
(read back from the bytes the engine was sent, and from the engine's own view of its prompt),
answers and engine errors carry no planted value, the engine's token counters stay within what
the ledger reserved, and a megabyte of personal data does not stall the gateway.

A recording proxy sits between the gateway and each engine: it keeps exactly what the engine
was given."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.domain.policy import PII_TYPES
from serving.protection.pii import Detector
from serving.protection.redaction import Redactor
from serving.settings import Settings
from tests.support import (
    Engines,
    GatewayProcess,
    RecordingProxy,
    assert_openai_error,
    bearer,
    cli,
    copy_manifests,
    gateway_settings,
    new_key,
    settings_env,
    write_policies,
)

pytestmark = pytest.mark.engine

EMAIL = "jane.doe@example.com"
MASK = "<EMAIL_1>"
POLICIES = """
version: 1
policies:
  redacting:
    models: [demo-chat, minilm-embed]
    scopes: [chat, completions, embeddings]
    caps: {max_tokens: 2}
    pii: {input: redact, output: allow}
    audit: {content: redacted}
  answers-redacted:
    models: [demo-chat]
    scopes: [chat, completions]
    caps: {max_tokens: 24, n: 2}
    pii: {input: allow, output: redact}
    audit: {content: encrypted}
  costly:
    models: [demo-chat, minilm-embed]
    scopes: [chat, completions, embeddings]
    caps: {max_tokens: 256, n: 4, prompts: 32}
  blocking:
    models: [demo-chat]
    scopes: [chat]
    pii: {input: block}
"""
WEATHER = {"type": "object", "properties": {EMAIL: {"type": "string", "enum": [EMAIL]}}}


class Platform:
    def __init__(self, root: Path, engines: Engines) -> None:
        self.root = root
        self.engines = engines
        self.proxies = {
            model: RecordingProxy(int(str(engines.state()[f"{model}-v1/r0"]["port"]))).start()
            for model in ("demo-chat", "minilm-embed")}
        models = copy_manifests(root / "models",
                                {m: p.port for m, p in self.proxies.items()})
        self.settings: Settings = gateway_settings(
            root, models, policies_file=write_policies(root / "config", POLICIES))
        self.gateway = GatewayProcess(self.settings, settings_env(self.settings),
                                      root / "gateway.log").start()
        self.keys = {name: new_key(self.settings, name, name) for name in
                     ("redacting", "answers-redacted", "costly", "blocking")}

    def post(self, policy: str, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.gateway.url + path, json=body,
                          headers=bearer(self.keys[policy]), timeout=120)

    def sent_upstream(self) -> bytes:
        return b"".join(p.take() for p in self.proxies.values())

    def record(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = cli(self.settings, "audit", "show", "--json", "--limit", "100000")
            for line in out.stdout.splitlines():
                if line.strip() and json.loads(line)["request_id"] == request_id:
                    return dict(json.loads(line))
            time.sleep(0.2)
        raise AssertionError(f"no audit record for {request_id}")

    def stop(self) -> None:
        self.gateway.stop()
        for proxy in self.proxies.values():
            proxy.stop()


@pytest.fixture(scope="module")
def platform(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("contract"), engines)
    try:
        yield p
    finally:
        p.stop()


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def _messages(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "demo-chat", "messages": list(messages), **extra}


# (endpoint, body, whether the demo chat template prints the field into the prompt)
TEXT_FIELDS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "content": ("chat", _messages({"role": "user", "content": f"mail {EMAIL}"}), True),
    "text part": ("chat", _messages({"role": "user", "content": [
        {"type": "text", "text": f"mail {EMAIL}"}]}), True),
    "refusal part": ("chat", _messages({"role": "user", "content": [
        {"type": "refusal", "refusal": f"no {EMAIL}"}]}), True),
    "thinking part": ("chat", _messages({"role": "user", "content": [
        {"type": "thinking", "thinking": f"hmm {EMAIL}"}]}), True),
    "name": ("chat", _messages({"role": "user", "name": EMAIL, "content": "hi"}), True),
    "system": ("chat", _messages({"role": "system", "content": EMAIL},
                                 {"role": "user", "content": "hi"}), True),
    "developer": ("chat", _messages({"role": "developer", "content": EMAIL},
                                    {"role": "user", "content": "hi"}), True),
    "reasoning": ("chat", _messages({"role": "user", "content": "q"},
                                    {"role": "assistant", "reasoning": f"r {EMAIL}",
                                     "content": "a"},
                                    {"role": "user", "content": "hi"}), True),
    "tool call": ("chat", _messages(
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": f"call-{EMAIL}", "type": "function",
                                              "function": {"name": "f", "arguments":
                                                           json.dumps({"to": EMAIL})}}]},
        {"role": "tool", "tool_call_id": f"call-{EMAIL}", "content": f"sent to {EMAIL}"},
        tool_choice="none"), True),
    "tools": ("chat", _chat(tool_choice="none", tools=[{"type": "function", "function": {
        "name": "notify", "description": f"writes to {EMAIL}", "parameters": WEATHER}}]), True),
    "documents": ("chat", _chat(documents=[{"title": "card", "text": f"owner {EMAIL}"}]), True),
    "stop": ("chat", _chat(stop=[EMAIL]), False),
    "bad_words": ("chat", _chat(bad_words=[EMAIL]), False),
    "user": ("chat", _chat(user=EMAIL), False),
    "response_format": ("chat", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "contact", "description": f"for {EMAIL}", "schema": WEATHER}}), False),
    "structured choice": ("chat", _chat(structured_outputs={"choice": [EMAIL, "no"]}), False),
    "structured regex": ("chat", _chat(structured_outputs={"regex": f"(no|{EMAIL})"}), False),
    "prompt": ("completions", {"model": "demo-chat", "prompt": f"mail {EMAIL}"}, True),
    "prompt list": ("completions", {"model": "demo-chat", "prompt": ["a", f"mail {EMAIL}"]},
                    True),
    "completion stop": ("completions", {"model": "demo-chat", "prompt": "x", "stop": EMAIL},
                        False),
    "input": ("embeddings", {"model": "minilm-embed", "input": f"mail {EMAIL}"}, False),
    "input list": ("embeddings", {"model": "minilm-embed", "input": ["a", f"mail {EMAIL}"]},
                   False),
    "embedding user": ("embeddings", {"model": "minilm-embed", "input": "a", "user": EMAIL},
                       False),
}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "embeddings": "/v1/embeddings"}


def _prompt_seen(answer: dict[str, Any]) -> str:
    """The prompt as the engine tokenised it, from its prompt log probabilities."""
    entries = answer.get("prompt_logprobs")
    if entries is None:
        entries = answer["choices"][-1]["prompt_logprobs"]
    return "".join(next(iter(e.values()))["decoded_token"] for e in entries if e)


@pytest.mark.parametrize("case", sorted(TEXT_FIELDS))
def test_every_text_field_reaches_the_engine_redacted(platform: Platform, case: str) -> None:
    endpoint, body, rendered = TEXT_FIELDS[case]
    if rendered:
        body = {**body, "prompt_logprobs": 0}
    platform.sent_upstream()
    resp = platform.post("redacting", PATHS[endpoint], body)
    assert resp.status_code == 200, resp.text  # the real engine read it all
    sent = platform.sent_upstream()
    assert EMAIL.encode() not in sent
    assert MASK.encode() in sent
    if rendered:
        seen = _prompt_seen(resp.json())
        assert MASK in seen and EMAIL not in seen, seen
    record = platform.record(resp.headers["x-request-id"])
    assert record["decisions"]["pii_input"]["action"] == "redact"
    assert MASK in record["content"]["request"] and EMAIL not in json.dumps(record)


def _stream(platform: Platform, policy: str, path: str, body: dict[str, Any]) -> bytes:
    with httpx.stream("POST", platform.gateway.url + path, json={**body, "stream": True},
                      headers=bearer(platform.keys[policy]), timeout=120) as resp:
        assert resp.status_code == 200
        return resp.read()


ANSWERS: dict[str, tuple[str, dict[str, Any]]] = {
    # The engine is made to write the planted value: a choice it must pick, a prompt it echoes,
    # a stop string it reports.
    "forced choice": ("/v1/chat/completions",
                      _chat(structured_outputs={"choice": [f"write to {EMAIL} now"]})),
    "two choices": ("/v1/chat/completions",
                    _chat(n=2, structured_outputs={"choice": [f"write to {EMAIL} now"]})),
    "echoed prompt": ("/v1/completions",
                      {"model": "demo-chat", "prompt": f"mail {EMAIL}", "echo": True}),
    "stop reason": ("/v1/completions", {
        "model": "demo-chat", "prompt": "x", "stop": [EMAIL],
        "structured_outputs": {"choice": [f"to {EMAIL} and more"]}}),
    "chat echo": ("/v1/chat/completions", _messages(
        {"role": "user", "content": "q"}, {"role": "assistant", "content": f"to {EMAIL}"},
        echo=True, add_generation_prompt=False, continue_final_message=True)),
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_answers_never_carry_a_planted_value(platform: Platform, case: str) -> None:
    path, body = ANSWERS[case]
    whole = platform.post("answers-redacted", path, body)
    assert whole.status_code == 200, whole.text
    # The model's next token may run into the address ("...example.comgoes"): a longer value,
    # another placeholder number; never the address itself.
    assert EMAIL not in whole.text and "<EMAIL_" in whole.text, whole.text
    streamed = _stream(platform, "answers-redacted", path, body)
    assert EMAIL.encode() not in streamed and b"<EMAIL_" in streamed, streamed.decode()


def test_engine_errors_never_echo_a_planted_value(platform: Platform) -> None:
    for body in (_chat(structured_outputs={"regex": f"({EMAIL}"}),
                 _chat(response_format={"type": "json_schema", "json_schema": {
                     "name": "x", "schema": {"type": EMAIL}}})):
        for policy in ("answers-redacted", "costly"):
            resp = platform.post(policy, "/v1/chat/completions", body)
            err = assert_openai_error(resp, 400)
            assert EMAIL not in resp.text and err["code"] == "invalid_structured_output"


def test_unredactable_answers_are_refused_when_answers_are_redacted(platform: Platform) -> None:
    for extra in ({"logprobs": True}, {"prompt_logprobs": 1}, {"return_token_ids": True}):
        resp = platform.post("answers-redacted", "/v1/chat/completions", _chat(**extra))
        err = assert_openai_error(resp, 400)
        assert err["code"] == "unsupported_parameter" and "redact" in err["message"]


def _engine_tokens(engines: Engines, deployment: str) -> float:
    return (engines.metric(deployment, "vllm:prompt_tokens_total")
            + engines.metric(deployment, "vllm:generation_tokens_total"))


COSTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat, n=4": ("/v1/chat/completions", _chat(n=4, max_tokens=40, ignore_eos=True)),
    "12 prompts, n=4": ("/v1/completions", {
        "model": "demo-chat", "prompt": [f"prompt number {i} " * 3 for i in range(12)],
        "n": 4, "max_tokens": 30, "ignore_eos": True}),
    "streamed, n=3": ("/v1/chat/completions", _chat(n=3, max_tokens=30, ignore_eos=True,
                                                    stream=True)),
    "embeddings, 20 inputs": ("/v1/embeddings", {
        "model": "minilm-embed", "input": [f"sentence number {i} about cats" for i in range(20)]}),
}


@pytest.mark.parametrize("case", sorted(COSTS))
def test_the_engines_own_counters_never_exceed_the_reservation(
        platform: Platform, engines: Engines, case: str) -> None:
    path, body = COSTS[case]
    deployment = "minilm-embed-v1" if "embeddings" in path else "demo-chat-v1"
    before = _engine_tokens(engines, deployment)
    if body.get("stream"):
        with httpx.stream("POST", platform.gateway.url + path, json=body,
                          headers=bearer(platform.keys["costly"]), timeout=120) as resp:
            resp.read()
    else:
        resp = platform.post("costly", path, body)
    assert resp.status_code == 200
    record = platform.record(resp.headers["x-request-id"])
    used = _engine_tokens(engines, deployment) - before
    assert 0 < used <= record["reserved_tokens"], (used, record["reserved_tokens"])
    # Charged what the engine reported: every prompt once, every choice's tokens.
    assert record["charged_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
    if "n=" in case:
        choices = body["n"] * (len(body["prompt"]) if "prompt" in body else 1)
        assert record["completion_tokens"] == choices * body["max_tokens"]


def test_max_completion_tokens_on_completions_is_refused_not_ignored(platform: Platform) -> None:
    resp = platform.post("costly", "/v1/completions", {
        "model": "demo-chat", "prompt": "x", "max_tokens": 1, "max_completion_tokens": 1024})
    err = assert_openai_error(resp, 400)
    assert err["code"] == "unsupported_parameter" and err["param"] == "max_completion_tokens"


def test_an_abandoned_multi_choice_stream_is_charged_every_choice(
        platform: Platform, engines: Engines) -> None:
    before = _engine_tokens(engines, "demo-chat-v1")
    body = _chat(n=3, max_tokens=250, ignore_eos=True, stream=True,
                 stream_options={"include_usage": True, "continuous_usage_stats": True})
    seen: dict[int, int] = {}
    prompt = 0
    with httpx.stream("POST", platform.gateway.url + "/v1/chat/completions", json=body,
                      headers=bearer(platform.keys["costly"]), timeout=120) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event.get("usage"):
                seen[event["choices"][0]["index"]] = event["usage"]["completion_tokens"]
                prompt = event["usage"]["prompt_tokens"]
            if len(seen) == 3 and min(seen.values()) >= 5:
                break  # the client walks away mid-stream
    record = platform.record(request_id)
    assert record["client_disconnected"] is True
    time.sleep(1)
    used = _engine_tokens(engines, "demo-chat-v1") - before
    charged = record["charged_tokens"]
    assert charged >= prompt + sum(seen.values())  # every choice, not one
    assert charged <= used <= record["reserved_tokens"]


def _health_while(platform: Platform, policy: str,
                  body: dict[str, Any]) -> tuple[httpx.Response, float, list[float]]:
    """Send ``body`` while another client polls /healthz every 10 ms: the answer, how long it
    took, and every health check's latency meanwhile."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=5) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get(platform.gateway.url + "/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.3)
        started = time.perf_counter()
        resp = platform.post(policy, "/v1/chat/completions", body)
        took = time.perf_counter() - started
        time.sleep(0.3)
    finally:
        done.set()
        poller.join()
    return resp, took, latencies


def test_a_megabyte_of_addresses_never_stalls_the_gateway(platform: Platform) -> None:
    addresses = " ".join(f"u{i}@ex.io" for i in range(120_000))
    content = addresses[:(1 << 20) - 200].rsplit(" ", 1)[0]
    body = _messages({"role": "user", "content": content})
    # What redacting this text costs here and now: a gateway that did it on its event loop
    # would hold every other client that long (the old gateway froze for seconds).
    started = time.perf_counter()
    Redactor(Detector(PII_TYPES)).redact(content)
    inline_s = time.perf_counter() - started
    # Refused by the gateway after the scan: the gateway's work alone.
    resp, took, latencies = _health_while(platform, "blocking", body)
    assert assert_openai_error(resp, 400)["code"] == "pii_detected"
    assert took < 2.0, f"blocking: {took:.2f} s"
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.05, f"blocking: /healthz p99 {p99 * 1000:.0f} ms"
    assert EMAIL not in resp.text and "u1@ex.io" not in resp.text
    # Redacted, forwarded, refused by the engine (far past its context). The engine tokenizes
    # the megabyte on the same two cores meanwhile, which slows every process for a moment:
    # the bound is then against a stall as long as the redaction, not against a busy machine.
    resp, took, latencies = _health_while(platform, "redacting", body)
    assert assert_openai_error(resp, 400)["code"] == "context_length_exceeded"
    assert took < 2.0, f"redacting: {took:.2f} s"
    assert statistics.median(latencies) < 0.02, latencies
    worst = max(latencies)
    assert worst < max(0.05, inline_s / 2), (
        f"redacting: /healthz waited {worst * 1000:.0f} ms; redacting inline takes "
        f"{inline_s * 1000:.0f} ms")
    assert EMAIL not in resp.text and "u1@ex.io" not in resp.text
