"""Guards on what a request asks and what an answer does: prompt-injection heuristics, the tool
allowlist, caps against unbounded consumption (OWASP Top 10 for LLM applications: LLM01, LLM06,
LLM10).

Pure functions over the decoded body. They return what they found (signal names, tool names,
parameters); the caller decides, per the client's policy, whether to flag or block. Nothing here
returns or keeps prompt text.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from serving.contract import ChatRequest, CompletionRequest
from serving.contract.chat import INSTRUCTION_ROLES
from serving.contract.common import NamedToolChoice
from serving.contract.walk import Slot
from serving.domain.policy import Caps, ToolGuard
from serving.protection import prefilter, scanning

# Each signal is one family of attack, with its weight; scores combine as independent
# evidence: 1 - prod(1 - w). One pattern per family, matched case-insensitively. Every
# repetition is bounded (whitespace runs at 64), so that a match is never longer than the
# overlap of ``scanning``'s windows.
_SIGNALS: dict[str, tuple[float, str]] = {
    "instruction_override": (0.6, (
        r"\b(?:ignore|disregard|forget|skip|override|bypass)\b.{0,40}?\b(?:previous|prior|above|"
        r"earlier|preceding|all|any|your|the|system)\b.{0,20}?\b(?:instructions?|prompts?|rules|"
        r"directions|guidelines|constraints|polic(?:y|ies))\b|\bnew instructions\s{0,64}:"
        r"|\bfrom now on,? you (?:will|must|are)\b")),
    "prompt_extraction": (0.6, (
        r"\b(?:reveal|show|print|repeat|output|display|tell me|give me|leak|dump|what (?:is|are|"
        r"were))\b.{0,30}?\b(?:your|the)\s{1,64}"
        r"(?:system|initial|hidden|original|secret|developer)\s{1,64}"
        r"(?:prompt|instructions?|message|rules)|\brepeat (?:the|all) (?:words|text|lines) "
        r"(?:above|before)\b")),
    "role_play_jailbreak": (0.5, (
        r"\b(?:DAN|do anything now|developer mode|jailbreak(?:ed)?|god mode)\b|\bpretend (?:that )?"
        r"(?:you are|to be|you're)\b.{0,40}?\b(?:unrestricted|unfiltered|uncensored|evil|without"
        r" (?:rules|limits|restrictions))|\byou are no longer\b|\b(?:without|no) (?:any )?"
        r"(?:restrictions|filters|limitations|censorship|guidelines)\b|\bact as (?:an? )?"
        r"(?:unrestricted|unfiltered|uncensored)\b")),
    "delimiter_injection": (0.4, (
        r"<\|im_start\|>\s{0,64}system|<\|system\|>|\[/?INST\]|<<SYS>>|</?system>"
        r"|^#{2,64}\s{0,64}system\s{0,64}:|<\|start_header_id\|>\s{0,64}system")),
}
_PATTERN = re.compile("|".join(f"(?P<{name}>{regex})" for name, (_, regex) in _SIGNALS.items()),
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)
_ENCODED = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_ENCODED_WEIGHT = 0.3  # a base64 blob that decodes to text; more when the text is an attack
# One Hyperscan pass says whether any signal, or a base64 run, could be in a text: each signal
# compiled in prefilter mode (a superset of what ``re`` matches), so the ``re`` scan runs only
# on texts where it may find something, and finds exactly what it would have found anyway.
# The text is scanned as UTF-8 bytes (``prefilter.Scanner(unicode=True)``), where a character
# takes up to four bytes and a space up to three: the copies Hyperscan compiles let each
# bounded run of characters take four times as many bytes, and a run of spaces any byte of a
# non-ASCII character too (three times as many).


def _widened(regex: str) -> bytes:
    regex = re.sub(r"\.\{0,(\d+)\}", lambda m: f".{{0,{4 * int(m.group(1))}}}", regex)
    regex = re.sub(r"\\s\{(\d+),(\d+)\}",
                   lambda m: f"[\\s\\x1c-\\x1f\\x80-\\xff]{{{m.group(1)},{3 * int(m.group(2))}}}",
                   regex)
    assert "\\s" not in regex.replace("[\\s", ""), "a \\s without bounds: widen it too"
    return regex.encode()


_SCANNER = prefilter.Scanner(
    [prefilter.Anchor("signal", _widened(regex), 0, prefilter.SIGNAL)
     for _, regex in _SIGNALS.values()]
    + [prefilter.Anchor("encoded", rb"[A-Za-z0-9+/]{40}", 0, prefilter.SINGLEMATCH)],
    unicode=True)


@dataclass(frozen=True, slots=True)
class InjectionScore:
    score: float
    signals: tuple[str, ...]


def injection_score(texts: Iterable[str]) -> InjectionScore:
    found: dict[str, float] = {}
    for text in texts:
        _score_text(text, found, depth=0)
    remaining = 1.0
    for weight in found.values():
        remaining *= 1.0 - weight
    return InjectionScore(round(1.0 - remaining, 3), tuple(sorted(found)))


def _score_text(text: str, found: dict[str, float], depth: int) -> None:
    maybe = _SCANNER.ends(text)  # None: too many places to tell; scan it all
    if maybe is None or "signal" in maybe:
        for match in scanning.finditer(_PATTERN, text):
            name = match.lastgroup
            if name is not None:
                found[name] = _SIGNALS[name][0]
    if depth == 0 and (maybe is None or "encoded" in maybe):
        for match in scanning.finditer(_ENCODED, text):
            decoded = _decoded_text(match.group())
            if decoded is None:
                continue
            found["encoded_payload"] = _ENCODED_WEIGHT
            inner: dict[str, float] = {}
            _score_text(decoded, inner, depth=1)
            if inner:
                found["encoded_payload"] = 0.7  # an attack hidden from plain-text filters


def _decoded_text(blob: str) -> str | None:
    try:
        raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    printable = sum(c.isprintable() or c.isspace() for c in text)
    if printable < 0.95 * len(text) or " " not in text:
        return None
    return text


def injection_texts(places: Iterable[Slot]) -> Iterator[str]:
    """Every text the engine reads except the operator's own instructions (system and developer
    messages): user messages, tool results, names, documents, tool definitions, schemas, stop
    strings, a completion prompt, in every content-part type."""
    for place in places:
        if place.role not in INSTRUCTION_ROLES:
            yield place.get()


def _canonical(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def declared_tools(request: ChatRequest) -> list[tuple[str, object]]:
    """(name, parameters) of every function the request declares or names in tool_choice."""
    out: list[tuple[str, object]] = [(tool.function.name, tool.function.parameters)
                                     for tool in request.tools or ()]
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        out.append((choice.function.name, _ANY))
    return out


_ANY = object()  # tool_choice names a tool without its schema


def disallowed_tools(guard: ToolGuard, request: ChatRequest) -> list[str]:
    """Names (sorted, unique) declared but not on the allowlist, or with parameters that differ
    from the policy's schema."""
    bad: set[str] = set()
    for name, parameters in declared_tools(request):
        spec = guard.allowed.get(name)
        if spec is None:
            bad.add(name or "(unnamed)")
        elif (spec.parameters is not None and parameters is not _ANY
              and _canonical(parameters) != _canonical(spec.parameters)):
            bad.add(name)
    return sorted(bad)


def called_tools(message: dict[str, Any]) -> Iterator[str]:
    """Function names in an answer's message or a streamed delta."""
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            yield function["name"]
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("name"), str):
        yield legacy["name"]


@dataclass(frozen=True, slots=True)
class CapBreach:
    param: str
    message: str
    code: str


def cap_breaches(caps: Caps, request: ChatRequest | CompletionRequest) -> list[CapBreach]:
    """The caps beyond ``max_tokens``, ``n``, ``prompts``, ``messages`` and ``body_bytes``
    (always enforced): log probabilities, stop sequences."""
    out: list[CapBreach] = []
    if isinstance(request, ChatRequest):
        asked = {"top_logprobs": max(request.top_logprobs or 0, 1 if request.logprobs else 0),
                 "prompt_logprobs": request.prompt_logprobs or 0}
    else:
        asked = {"logprobs": request.logprobs or 0,
                 "prompt_logprobs": request.prompt_logprobs or 0}
    for param, value in asked.items():
        if value > caps.logprobs:
            out.append(CapBreach(param, f"'{param}' is beyond this client's cap "
                                 f"({caps.logprobs}).", "logprobs_exceeded"))
    stop = request.stop
    count = len(stop) if isinstance(stop, list) else (1 if isinstance(stop, str) else 0)
    if count > caps.stop:
        out.append(CapBreach("stop", f"{count} stop sequences; this client may give at most "
                             f"{caps.stop}.", "too_many_stop_sequences"))
    return out
