"""The filter on an engine's answer, one per answer: tool calls off the client's allowlist,
personal data (allow / redact, streamed with a bounded hold-back), and the answer's text kept
when the audit record is to hold it. Built by ``Protector.output_filter``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from serving.contract import answers
from serving.domain.outcome import Decisions
from serving.domain.policy import Policy
from serving.errors import GatewayError
from serving.protection import guards
from serving.protection.redaction import Redactor, StreamRedactor

# A guard decision for the metrics: (guard, action, type, count).
Count = Callable[[str, str, str, int], None]
# Per streamed field (choice, field, tool-call index): where its new text sits in this read's
# events (event, container, key), in order.
_Grown = dict[tuple[int, str, int], list[tuple[int, dict[str, Any], str]]]


class ToolCallRefused(GatewayError):
    status = 502
    type = "upstream_error"
    code = "tool_call_refused"


class OutputFilter:
    """One per answer. Complete answers go through ``body``; streamed events through
    ``event`` (which edits the decoded event in place) and ``finish``.

    Every string of the answer is filtered unless the output contract names it an identifier
    (``contract.answers``); the fields that grow across a stream (content, reasoning, a tool
    call's arguments, a completion's text) keep a bounded hold-back per choice."""

    def __init__(self, count: Count, policy: Policy, redactor: Redactor,
                 decisions: Decisions) -> None:
        self._count = count
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
        if self._tools.mode == "off" or (
                "tool_calls" not in message and "function_call" not in message):
            return
        refused = sorted({n for n in guards.called_tools(message) if n not in self._tools.allowed})
        if not refused:
            return
        names = [n[:64] for n in refused]
        self._decisions.tools = {"action": self._tools.mode, "refused_calls": names}
        self._count("tools", self._tools.mode, "response", 1)
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
        return self.events([payload])[0]

    def events(self, payloads: list[dict[str, Any]]) -> list[bool]:
        """Decoded stream events that arrived together (one read from the engine), in order,
        edited in place; for each, True when it was changed. Raises ``ToolCallRefused``.

        What the growing fields gained across these events is redacted in one pass (the
        events go out in one write anyway), and what that releases goes out in the last of
        them that carries the field: the client gets the same text at the same moment, for a
        scan per read rather than per token."""
        changed = [False] * len(payloads)
        grown: _Grown = {}
        redact = self._redact
        for i, payload in enumerate(payloads):
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
                        if isinstance(delta.get(key), str):
                            self._collect(grown, i, delta, key, (index, key, 0), redact)
                    for call in delta.get("tool_calls") or ():
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict) and isinstance(
                                function.get("arguments"), str):
                            at = call.get("index", 0)
                            self._collect(grown, i, function, "arguments",
                                          (index, "arguments", at if isinstance(at, int) else 0),
                                          redact)
                for key in answers.STREAMED_CHOICE:
                    if isinstance(choice.get(key), str):
                        self._collect(grown, i, choice, key, (index, key, 0), redact)
                if final:
                    self._release(grown, changed, index)
                    changed[i] |= self._flush_choice(choice, index)
            # Every other string of the event, within the event.
            for place, key in list(answers.strings(payload, answers.STREAMED_NAMES)):
                text = place[key]
                out = self._whole(text)
                if out != text:
                    place[key] = out
                    changed[i] = True
        if grown:
            self._release(grown, changed, None)
        return changed

    def _collect(self, grown: _Grown, event: int, place: dict[str, Any], key: str,
                 stream_key: tuple[int, str, int], redact: bool) -> None:
        """A streamed field's new text (a string): kept as it is, or queued for ``_release``."""
        if not redact:
            self._keep(place[key], place[key])
            return
        queued = grown.get(stream_key)
        if queued is None:
            grown[stream_key] = [(event, place, key)]
        else:
            queued.append((event, place, key))

    def _release(self, grown: _Grown, changed: list[bool], choice: int | None) -> None:
        """Redact what the streamed fields (of the choice that just finished, or all) gained,
        each with its hold-back: the text released goes into the field's last place and the
        earlier places are emptied. A finished choice's fields are flushed, except tool-call
        arguments (``_flush_choice`` puts what they still hold into the call's entry)."""
        for stream_key in [k for k in grown if choice is None or k[0] == choice]:
            places = grown.pop(stream_key)
            text = ("".join(place[key] for _, place, key in places) if len(places) > 1
                    else places[0][1][places[0][2]])
            stream = self._streams.get(stream_key)
            if stream is None:
                stream = self._streams[stream_key] = StreamRedactor(self._redactor)
            out = stream.feed(text)
            if choice is not None and stream_key[1] != "arguments":
                out += stream.flush()
                del self._streams[stream_key]
            self._keep(text, out)
            *earlier, (last, place, key) = places
            for event, before, name in earlier:
                if before[name]:
                    before[name] = ""
                    changed[event] = True
            if place[key] != out:
                place[key] = out
                changed[last] = True

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
            self._count("pii_output", "redact", kind, n)

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
