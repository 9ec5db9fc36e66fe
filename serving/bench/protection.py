"""What data protection costs: the gateway with redaction, guards and the audit trail on, against
the same gateway without them and the bare proxy, at c=16 on ~1 KB prompts (nginx answers);
and, in-process, the detector's and the injection guard's cost per KB, the detector on a
megabyte of dense findings, the request contract's cost per ~1 KB request and the output
filter's cost per streamed chunk, each against a baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from serving import contract
from serving.bench import targets
from serving.bench.run import Cell, _measure
from serving.contract.walk import slots
from serving.domain.policy import Policy
from serving.metrics import GatewayMetrics
from serving.protection import guards, prefilter
from serving.protection.pii import Detector
from serving.protection.protector import Protector
from serving.upstream.sse import StreamAccountant

_TEXT = ("Hello, I am writing about invoice 2024-118 for the quarterly maintenance contract. "
         "Our finance team, reachable at billing.team@example.com, noticed that the amount "
         "charged in October differs from the purchase order by a few hundred euros. Could you "
         "check the line items for the on-site visits and the replacement parts, and confirm "
         "whether the discount agreed in the spring still applies? The payment was made from "
         "the account FR76 3000 6000 0112 3456 7890 189 on the fifth. Please summarise what "
         "happened in plain words, list the items that look wrong, and suggest how we should "
         "proceed with the correction, ideally before the end of the month. Thank you for "
         "your help with this matter; we value the partnership and hope to settle it soon.")
PROMPT_1KB = (_TEXT * 2)[:1000]
BODY_1KB = json.dumps({"model": "demo-chat", "max_tokens": 16,
                       "messages": [{"role": "user", "content": PROMPT_1KB}]})


def gateway_cells(seconds: float, rounds: int, concurrency: int, models_dir: Path,
                  say: Callable[[str], None]) -> list[Cell]:
    with tempfile.TemporaryDirectory(prefix="enclave-bench-protect-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        upstream = stack.enter_context(targets.nginx(root / "nginx"))
        port = int(upstream.rsplit(":", 1)[1])
        models = targets.bench_models(root, {"demo-chat": port}, models_dir)
        bare = stack.enter_context(targets.bare_proxy(root, upstream))
        plain, key = stack.enter_context(targets.gateway(root / "gw-plain", models))
        protected, pkey = stack.enter_context(targets.gateway(
            root / "gw-protected", models, policies=targets.PROTECTED_POLICIES))
        plan = {"bare proxy": (bare + "/v1/chat/completions", None),
                "gateway": (plain + "/v1/chat/completions", key),
                "gateway + protection": (protected + "/v1/chat/completions", pkey)}
        return _measure(plan, BODY_1KB, [concurrency], seconds, rounds, say)


def _per_call_us(fn: Callable[[], object], seconds: float = 1.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        n += 50
    return (time.perf_counter() - start) / n * 1e6


def inprocess(seconds: float = 1.0) -> dict[str, float]:
    """Microseconds: detector and injection guard per KB; output filter per streamed chunk
    (the accountant alone as the baseline)."""
    prefilter.warm()  # as the gateway does at start: not timed
    detector = Detector()
    plain = ("The committee reviewed the proposal and agreed to continue the pilot for three "
             "more months, with a report due in the spring. " * 10)[:1024]
    out = {
        "detector, plain text (us/KB)": _per_call_us(lambda: detector.find(plain), seconds),
        "detector, with PII (us/KB)": _per_call_us(lambda: detector.find(PROMPT_1KB[:1024]),
                                                   seconds),
        "injection guard (us/KB)": _per_call_us(
            lambda: guards.injection_score([PROMPT_1KB]), seconds),
    }
    out.update(_contract_us(seconds))
    out.update(_dense_ms())
    events = [b"data: " + orjson.dumps({
        "id": "c", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": f" word{i} and more"}, "finish_reason": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": i, "total_tokens": 10 + i}})
        + b"\n\n" for i in range(200)]
    policy = Policy.model_validate({"scopes": ["chat"], "models": ["*"],
                                    "pii": {"output": "redact"},
                                    "audit": {"content": "redacted"}})
    protector = Protector(GatewayMetrics())

    def stream(filtered: bool) -> None:
        flt = protector.output_filter(policy, None) if filtered else None
        acct = StreamAccountant(True, "drop", flt.events if flt is not None else None)
        for event in events:
            acct.feed(event)

    base = _per_call_us(lambda: stream(False), seconds) / len(events)
    filtered = _per_call_us(lambda: stream(True), seconds) / len(events)
    out["stream chunk, accountant only (us)"] = base
    out["stream chunk, with output filter (us)"] = filtered
    out["output filter adds per chunk (us)"] = filtered - base
    presidio = _presidio_us_per_kb(plain, seconds)
    if presidio is not None:
        out["Presidio pattern recognizers, plain text (us/KB)"] = presidio
    return out


def _presidio_us_per_kb(text: str, seconds: float) -> float | None:
    """Presidio's own recognizers on the same text, when it is installed (it is not a
    dependency: ``pip install presidio-analyzer``)."""
    try:
        from presidio_analyzer import predefined_recognizers as pr
    except ImportError:
        return None
    recognizers = [pr.EmailRecognizer(), pr.PhoneRecognizer(), pr.CreditCardRecognizer(),
                   pr.IbanRecognizer(), pr.IpRecognizer(), pr.UsSsnRecognizer()]

    def run() -> None:
        for r in recognizers:
            r.analyze(text, r.supported_entities, None)

    return _per_call_us(run, seconds)


def _contract_us(seconds: float) -> dict[str, float]:
    """The request contract on a ~1 KB chat request (validate, walk the text, re-serialise)
    against the JSON parse and dump that the gateway did before it had one."""
    raw = BODY_1KB.encode()

    def contract_path() -> None:
        request = contract.parse("chat", raw)
        slots(request)
        contract.body(request)

    def json_path() -> None:
        orjson.dumps(orjson.loads(raw))

    base = _per_call_us(json_path, seconds)
    full = _per_call_us(contract_path, seconds)
    return {"JSON parse + dump, ~1 KB chat (us)": base,
            "request contract, ~1 KB chat: validate + text slots + serialise (us)": full,
            "request contract adds (us)": full - base}


def _dense_ms() -> dict[str, float]:
    """The detector on 1 MiB where every few bytes are a finding (best of three)."""
    emails = " ".join(f"u{i}@ex.io" for i in range(120_000))[:1 << 20]
    mixed = ("Mail jane.doe@example.com or call +33 6 12 34 56 78; card 4111 1111 1111 1111; "
             "host 10.1.2.3. " * 12_000)[:1 << 20]
    detector = Detector()
    out = {}
    for name, text in (("1 MiB of e-mail addresses", emails),
                       ("1 MiB of mixed findings", mixed)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            detector.find(text)
            best = min(best, time.perf_counter() - started)
        out[f"detector, {name} (ms)"] = best * 1000
    return out
