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
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from serving.contract import ChatRequest, CompletionRequest, EmbeddingRequest, Request, answers
from serving.contract.walk import Slot, slots, write_back
from serving.errors import GatewayError, InspectionTooLong, InvalidRequest
from serving.metrics import GatewayMetrics
from serving.services import guards
from serving.services.pii import Detector, ScanTooLong
from serving.services.redaction import Redactor, StreamRedactor
from serving.storage.policies import Policy


class ToolCallRefused(GatewayError):
    status = 502
    type = "upstream_error"
    code = "tool_call_refused"


@dataclass(slots=True)
class Decisions:
    """What the guards decided for one request; recorded in its audit record."""

    pii_input: Counter[str] = field(default_factory=Counter)
    pii_input_action: str | None = None
    pii_output: Counter[str] = field(default_factory=Counter)
    pii_output_action: str | None = None
    injection: dict[str, Any] | None = None
    tools: dict[str, Any] | None = None
    caps: list[dict[str, str]] = field(default_factory=list)
    blocked: str | None = None  # which guard refused the request

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.pii_input:
            out["pii_input"] = {"action": self.pii_input_action, "types": dict(self.pii_input)}
        if self.pii_output:
            out["pii_output"] = {"action": self.pii_output_action,
                                 "types": dict(self.pii_output)}
        if self.injection is not None:
            out["injection"] = self.injection
        if self.tools is not None:
            out["tools"] = self.tools
        if self.caps:
            out["caps"] = self.caps
        if self.blocked is not None:
            out["blocked"] = self.blocked
        return out


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

    def _count(self, guard: str, action: str, kind: str, n: int = 1) -> None:
        self.metrics.guard_decisions.labels(guard, action, kind).inc(n)

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
        return OutputFilter(self, policy, redactor, decisions)


def _param(request: Request) -> str:
    if isinstance(request, ChatRequest):
        return "messages"
    return "prompt" if isinstance(request, CompletionRequest) else "input"


class OutputFilter:
    """One per answer. Complete answers go through ``body``; streamed events through
    ``event`` (which edits the decoded event in place) and ``finish``.

    Every string of the answer is filtered unless the output contract names it an identifier
    (``contract.answers``); the fields that grow across a stream (content, reasoning, a tool
    call's arguments, a completion's text) keep a bounded hold-back per choice."""

    def __init__(self, protector: Protector, policy: Policy, redactor: Redactor,
                 decisions: Decisions) -> None:
        self._protector = protector
        self._redact = policy.pii.output == "redact"
        self._tools = policy.guards.tools
        self._content = policy.audit.content
        self._redactor = redactor
        self._decisions = decisions
        # (choice index, field, tool-call index) -> its hold-back
        self._streams: dict[tuple[int, str, int], StreamRedactor] = {}
        self._kept: list[str] | None = [] if self._content != "none" else None
        # What the redactor had counted in the prompt: the answer's findings are the rest.
        self._base: Counter[str] = Counter(redactor.counts)

    @property
    def rewrites_events(self) -> bool:
        return self._redact or self._tools.mode != "off"

    def _check_tools(self, message: dict[str, Any]) -> None:
        if self._tools.mode == "off":
            return
        refused = sorted({n for n in guards.called_tools(message) if n not in self._tools.allowed})
        if not refused:
            return
        names = [n[:64] for n in refused]
        self._decisions.tools = {"action": self._tools.mode, "refused_calls": names}
        self._protector._count("tools", self._tools.mode, "response")
        if self._tools.mode == "block":
            self._decisions.blocked = "tools"
            raise ToolCallRefused(
                f"The model called tool(s) not allowed for this client: {', '.join(names)}.")

    def _keep(self, original: str, sent: str) -> None:
        if self._kept is not None:
            self._kept.append(original if self._content == "encrypted" or not self._redact
                              else sent)

    def _whole(self, text: str) -> str:
        out = self._redactor.redact(text) if self._redact else text
        self._keep(text, out)
        return out

    def body(self, body: bytes) -> bytes:
        """A complete answer; raises ``ToolCallRefused``."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(payload, dict):
            return body
        for choice in payload.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                self._check_tools(choice["message"])
        changed = False
        for place, key in list(answers.strings(payload)):
            text = place[key]
            out = self._whole(text)
            if out != text:
                place[key] = out
                changed = True
        self._settle()
        return orjson.dumps(payload) if changed else body

    def event(self, payload: dict[str, Any]) -> bool:
        """A decoded stream event; True when it was changed. Raises ``ToolCallRefused``."""
        changed = False
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                index = 0
            final = choice.get("finish_reason") is not None
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._check_tools(delta)
                for key in answers.STREAMED_DELTA:
                    changed |= self._grow(delta, key, (index, key, 0), final)
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        at = call.get("index", 0)
                        changed |= self._grow(function, "arguments",
                                              (index, "arguments",
                                               at if isinstance(at, int) else 0), False)
            for key in answers.STREAMED_CHOICE:
                changed |= self._grow(choice, key, (index, key, 0), final)
            if final:
                changed |= self._flush_choice(choice, index)
        # Every other string of the event, within the event.
        for place, key in list(answers.strings(payload, answers.STREAMED_NAMES)):
            text = place[key]
            out = self._whole(text)
            if out != text:
                place[key] = out
                changed = True
        return changed

    def _grow(self, place: dict[str, Any], key: str, stream_key: tuple[int, str, int],
              final: bool) -> bool:
        """One streamed field's new text, redacted with its hold-back."""
        text = place.get(key)
        if not isinstance(text, str):
            return False
        if not self._redact:
            self._keep(text, text)
            return False
        stream = self._streams.get(stream_key)
        if stream is None:
            stream = self._streams[stream_key] = StreamRedactor(self._redactor)
        out = stream.feed(text)
        if final:
            out += stream.flush()
            del self._streams[stream_key]
        self._keep(text, out)
        if out != text:
            place[key] = out
            return True
        return False

    def _flush_choice(self, choice: dict[str, Any], index: int) -> bool:
        """The choice ended: what its other streamed fields still hold goes out with this
        event (tool-call arguments into that call's entry)."""
        changed = False
        for stream_key in [k for k in self._streams if k[0] == index]:
            rest = self._streams.pop(stream_key).flush()
            if not rest:
                continue
            changed = True
            _, field, at = stream_key
            if field in answers.STREAMED_CHOICE:
                choice[field] = (choice.get(field) or "") + rest
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if field == "arguments":
                calls = delta.setdefault("tool_calls", [])
                entry = next((c for c in calls if isinstance(c, dict)
                              and c.get("index", 0) == at), None)
                if entry is None:
                    entry = {"index": at, "function": {}}
                    calls.append(entry)
                function = entry.setdefault("function", {})
                function["arguments"] = (function.get("arguments") or "") + rest
            else:
                delta[field] = (delta.get(field) or "") + rest
        return changed

    def _settle(self) -> None:
        if not self._redact:
            return
        new = self._redactor.counts - self._base
        if not new:
            return
        self._base = Counter(self._redactor.counts)
        self._decisions.pii_output.update(new)
        self._decisions.pii_output_action = "redact"
        for kind, n in new.items():
            self._protector._count("pii_output", "redact", kind, n)

    def finish(self) -> None:
        """The answer ended. Text still held back by a stream that ended without a finish
        reason (the engine broke off) is dropped, never sent unredacted."""
        self._streams.clear()
        self._settle()

    @property
    def response_text(self) -> str | None:
        if self._kept is None:
            return None
        text = "".join(self._kept)
        if self._content == "redacted" and not self._redact:
            return self._redactor.redact(text)
        return text
