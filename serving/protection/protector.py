"""Applying a client's data-protection and guard policy to one request and its answer.

``inspect`` runs on the request body before it reaches an engine: caps, tool allowlist,
injection score, personal data (allow / redact / block). ``OutputFilter`` runs on the answer,
complete or streamed: tool calls off the allowlist, personal data (allow / redact), and it keeps
the answer's text when the audit record is to hold it. Every decision goes into the request's
``Decisions`` (for the audit record) and into the metrics, by type: never a value.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from serving.contract import ChatRequest, CompletionRequest, EmbeddingRequest, Request
from serving.contract.walk import Slot, slots, write_back
from serving.domain.outcome import Decisions
from serving.domain.policy import Policy
from serving.errors import InspectionTooLong, InvalidRequest
from serving.metrics import GatewayMetrics
from serving.protection import guards, prefilter
from serving.protection.output import OutputFilter
from serving.protection.pii import Detector, ScanTooLong
from serving.protection.redaction import Redactor


@lru_cache(maxsize=64)
def _detector(types: tuple[str, ...]) -> Detector:
    return Detector(types)


@dataclass(slots=True)
class Inspection:
    """The outcome of ``inspect`` for one request."""

    decisions: Decisions
    redactor: Redactor | None
    request_text: str | None  # for the audit record's content, per its policy


def _within(texts: Iterable[str], deadline: float | None) -> Iterator[str]:
    for text in texts:
        if deadline is not None and time.monotonic() > deadline:
            raise ScanTooLong
        yield text


class Protector:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        prefilter.warm()  # compiled now, not on the first request

    def _count(self, guard: str, action: str, kind: str, n: int = 1) -> None:
        self.metrics.count_guard(guard, action, kind, n)

    def inspect(self, policy: Policy, request: Request, decisions: Decisions,
                deadline: float | None = None) -> Inspection:
        """Caps, tools, injection and personal data over every text the engine will read (the
        contract's text slots); redacts in place under a redacting policy. Raises
        ``InvalidRequest`` when a guard in ``block`` mode refuses the request (``decisions``
        then says which), ``InspectionTooLong`` past ``deadline`` (``time.monotonic()``)."""
        places = slots(request)
        try:
            if not isinstance(request, EmbeddingRequest):
                self._caps(policy, request, decisions)
                if isinstance(request, ChatRequest):
                    self._tools(policy, request, decisions)
                self._injection(policy, places, request, decisions, deadline)
            return self._pii(policy, places, request, decisions, deadline)
        except ScanTooLong:
            raise InspectionTooLong(
                "The request's text took too long to inspect; send less text per request.",
                param=_param(request)) from None

    def _caps(self, policy: Policy, request: ChatRequest | CompletionRequest,
              decisions: Decisions) -> None:
        caps = policy.caps
        if caps.mode == "off":
            return
        breaches = guards.cap_breaches(caps, request)
        for b in breaches:
            decisions.caps.append({"param": b.param, "action": caps.mode})
            self._count("caps", caps.mode, b.param)
        if breaches and caps.mode == "block":
            decisions.blocked = "caps"
            b = breaches[0]
            raise InvalidRequest(b.message, param=b.param, code=b.code)

    def _tools(self, policy: Policy, request: ChatRequest, decisions: Decisions) -> None:
        guard = policy.guards.tools
        if guard.mode == "off":
            return
        bad = guards.disallowed_tools(guard, request)
        if not bad:
            return
        names = [name[:64] for name in bad]
        decisions.tools = {"action": guard.mode, "refused": names}
        self._count("tools", guard.mode, "request")
        if guard.mode == "block":
            decisions.blocked = "tools"
            raise InvalidRequest(
                f"Tool(s) not allowed for this client, or with parameters that differ from the "
                f"approved schema: {', '.join(names)}.", param="tools", code="tool_not_allowed")

    def _injection(self, policy: Policy, places: list[Slot], request: Request,
                   decisions: Decisions, deadline: float | None) -> None:
        guard = policy.guards.injection
        if guard.mode == "off":
            return
        result = guards.injection_score(_within(guards.injection_texts(places), deadline))
        if result.score < guard.threshold:
            return
        decisions.injection = {"action": guard.mode, "score": result.score,
                               "signals": list(result.signals)}
        for signal in result.signals:
            self._count("injection", guard.mode, signal)
        if guard.mode == "block":
            decisions.blocked = "injection"
            raise InvalidRequest(
                "The request looks like a prompt-injection attempt "
                f"({', '.join(result.signals)}) and this client's policy blocks it.",
                param=_param(request), code="prompt_injection")

    def _pii(self, policy: Policy, places: list[Slot], request: Request, decisions: Decisions,
             deadline: float | None) -> Inspection:
        mode = policy.pii.input
        content = policy.audit.content
        if mode == "allow" and content == "none":
            return Inspection(decisions, None, None)
        redactor = Redactor(_detector(policy.pii.types))
        originals = [place.get() for place in places]
        found = [redactor.find(text, deadline) for text in originals]
        kinds: Counter[str] = Counter(f.type for fs in found for f in fs)
        if kinds and mode == "block":
            decisions.pii_input.update(kinds)
            decisions.pii_input_action = "block"
            decisions.blocked = "pii"
            for kind, n in kinds.items():
                self._count("pii_input", "block", kind, n)
            raise InvalidRequest(
                "The request contains personal data or secrets that this client may not send: "
                f"{', '.join(sorted(kinds))}.", param=_param(request), code="pii_detected")
        redacted = [redactor.redact(text, fs) if fs else text
                    for text, fs in zip(originals, found, strict=True)]
        if kinds:
            decisions.pii_input.update(kinds)
            decisions.pii_input_action = "redact" if mode == "redact" else "allow"
            for kind, n in kinds.items():
                self._count("pii_input", decisions.pii_input_action, kind, n)
            if mode == "redact":
                write_back(places, redacted)
        request_text = None
        if content != "none":
            request_text = "\n".join(originals if content == "encrypted" else redacted)
        return Inspection(decisions, redactor, request_text)

    def output_filter(self, policy: Policy, inspection: Inspection | None) -> OutputFilter | None:
        """What the relay applies to the answer; None when nothing is to be done."""
        redact = policy.pii.output == "redact"
        tools = policy.guards.tools
        keep = policy.audit.content != "none"
        if not redact and tools.mode == "off" and not keep:
            return None
        if inspection is None or inspection.redactor is None:
            redactor = Redactor(_detector(policy.pii.types))
            decisions = inspection.decisions if inspection is not None else Decisions()
        else:
            redactor, decisions = inspection.redactor, inspection.decisions
        return OutputFilter(self._count, policy, redactor, decisions)


def _param(request: Request) -> str:
    if isinstance(request, ChatRequest):
        return "messages"
    return "prompt" if isinstance(request, CompletionRequest) else "input"
