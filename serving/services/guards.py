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

from serving.storage.policies import Caps, ToolGuard

# Each signal is one family of attack, with its weight; scores combine as independent
# evidence: 1 - prod(1 - w). One pattern per family, matched case-insensitively.
_SIGNALS: dict[str, tuple[float, str]] = {
    "instruction_override": (0.6, (
        r"\b(?:ignore|disregard|forget|skip|override|bypass)\b.{0,40}?\b(?:previous|prior|above|"
        r"earlier|preceding|all|any|your|the|system)\b.{0,20}?\b(?:instructions?|prompts?|rules|"
        r"directions|guidelines|constraints|polic(?:y|ies))\b|\bnew instructions\s*:|\bfrom now "
        r"on,? you (?:will|must|are)\b")),
    "prompt_extraction": (0.6, (
        r"\b(?:reveal|show|print|repeat|output|display|tell me|give me|leak|dump|what (?:is|are|"
        r"were))\b.{0,30}?\b(?:your|the)\s+(?:system|initial|hidden|original|secret|developer)\s+"
        r"(?:prompt|instructions?|message|rules)|\brepeat (?:the|all) (?:words|text|lines) "
        r"(?:above|before)\b")),
    "role_play_jailbreak": (0.5, (
        r"\b(?:DAN|do anything now|developer mode|jailbreak(?:ed)?|god mode)\b|\bpretend (?:that )?"
        r"(?:you are|to be|you're)\b.{0,40}?\b(?:unrestricted|unfiltered|uncensored|evil|without"
        r" (?:rules|limits|restrictions))|\byou are no longer\b|\b(?:without|no) (?:any )?"
        r"(?:restrictions|filters|limitations|censorship|guidelines)\b|\bact as (?:an? )?"
        r"(?:unrestricted|unfiltered|uncensored)\b")),
    "delimiter_injection": (0.4, (
        r"<\|im_start\|>\s*system|<\|system\|>|\[/?INST\]|<<SYS>>|</?system>|^#{2,}\s*system\s*:|"
        r"<\|start_header_id\|>\s*system")),
}
_PATTERN = re.compile("|".join(f"(?P<{name}>{regex})" for name, (_, regex) in _SIGNALS.items()),
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)
_ENCODED = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_ENCODED_WEIGHT = 0.3  # a base64 blob that decodes to text; more when the text is an attack
_HINTS = ("ignore", "disregard", "forget", "override", "bypass", "reveal", "repeat", "prompt",
          "instruction", "pretend", "dan", "developer", "jailbreak", "restriction", "filter",
          "system", "inst]", "<<sys", "<|", "act as", "you are no longer", "new instructions",
          "from now on")


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
    lowered = text.lower()
    if any(hint in lowered for hint in _HINTS):
        for match in _PATTERN.finditer(text):
            name = match.lastgroup
            if name is not None:
                found[name] = _SIGNALS[name][0]
    if depth == 0 and len(text) >= 40:
        for match in _ENCODED.finditer(text):
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


def injection_texts(payload: dict[str, Any], endpoint: str) -> Iterator[str]:
    """What an attacker controls: the user's messages and tool results (indirect injection),
    a completion prompt. The operator's system prompt is not scored."""
    if endpoint == "chat":
        for message in payload.get("messages") or ():
            if not isinstance(message, dict) or message.get("role") not in ("user", "tool"):
                continue
            content = message.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
    elif endpoint == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            yield prompt
        elif isinstance(prompt, list):
            yield from (p for p in prompt if isinstance(p, str))


def _canonical(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def declared_tools(payload: dict[str, Any]) -> list[tuple[str, object]]:
    """(name, parameters) of every function the request declares or names in tool_choice."""
    out: list[tuple[str, object]] = []
    for tool in payload.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            out.append((str(function.get("name", "")), function.get("parameters")))
        else:
            out.append(("", None))  # a tool of another kind: not on any allowlist
    for function in payload.get("functions") or ():  # the legacy field
        if isinstance(function, dict):
            out.append((str(function.get("name", "")), function.get("parameters")))
    choice = payload.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out.append((str(choice["function"].get("name", "")), _ANY))
    return out


_ANY = object()  # tool_choice names a tool without its schema


def disallowed_tools(guard: ToolGuard, payload: dict[str, Any]) -> list[str]:
    """Names (sorted, unique) declared but not on the allowlist, or with parameters that differ
    from the policy's schema."""
    bad: set[str] = set()
    for name, parameters in declared_tools(payload):
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


def _count(value: object) -> int:
    if value is None or value is False:
        return 0
    if value is True:
        return 1
    if isinstance(value, int):
        return value
    return -1  # not a number: the engine refuses it


def cap_breaches(caps: Caps, payload: dict[str, Any]) -> list[CapBreach]:
    """The caps beyond ``max_tokens``, ``n``, ``messages`` and ``body_bytes`` (checked by
    admission): ``best_of``, log probabilities, stop sequences."""
    out: list[CapBreach] = []
    best_of = _count(payload.get("best_of"))
    if best_of > caps.best_of:
        out.append(CapBreach("best_of", f"'best_of' is {best_of}; this client may ask for at "
                             f"most {caps.best_of}.", "best_of_exceeded"))
    for param in ("logprobs", "top_logprobs"):
        value = payload.get(param)
        # Chat's logprobs is a boolean (top_logprobs says how many); completions' an integer.
        asked = (1 if value else 0) if isinstance(value, bool) else _count(value)
        if asked > caps.logprobs or (caps.logprobs == 0 and value):
            out.append(CapBreach(param, f"'{param}' is beyond this client's cap "
                                 f"({caps.logprobs}).", "logprobs_exceeded"))
    stop = payload.get("stop")
    count = len(stop) if isinstance(stop, list) else (1 if isinstance(stop, str) else 0)
    if count > caps.stop:
        out.append(CapBreach("stop", f"{count} stop sequences; this client may give at most "
                             f"{caps.stop}.", "too_many_stop_sequences"))
    return out
