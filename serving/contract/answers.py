"""The output side of the contract: which strings in an engine's answer are text.

Deny by default, as for requests: every string in an answer is text (filtered for personal data)
unless its member name says it is an identifier or a label the engine chose from a fixed set.
A field a future engine adds is therefore filtered without anyone listing it. ``usage`` holds
counts only and is skipped whole.

Streamed answers: the fields that grow across events (``STREAMED``) are filtered with a
hold-back (a value split between two events is still found); any other string in an event is
filtered within that event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Identifiers and labels from a fixed vocabulary; never text the model wrote or the client sent.
NOT_TEXT = frozenset({
    "id", "object", "model", "role", "type", "finish_reason", "system_fingerprint",
    "service_tier", "encoding_format", "usage",
})
# The streamed fields that grow event by event: in a chat choice's delta, in a completion
# choice, and a tool call's arguments (per tool-call index).
STREAMED_DELTA = ("content", "reasoning", "reasoning_content")
STREAMED_CHOICE = ("text",)
STREAMED_NAMES = frozenset({*STREAMED_DELTA, *STREAMED_CHOICE, "arguments"})


def strings(node: Any, skip: frozenset[str] = frozenset()) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every text string under ``node``, without recursion. Members named
    in ``NOT_TEXT`` are passed over whole; string members named in ``skip`` are passed over
    (what they hold below, when not a string, is not)."""
    stack: list[Any] = [node]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        if isinstance(item, dict):
            for key, value in item.items():
                kind = type(value)
                if kind in _SCALARS:
                    continue
                if kind is str or isinstance(value, str):
                    if key not in skip and key not in NOT_TEXT:
                        yield item, key
                elif isinstance(value, dict | list) and key not in NOT_TEXT:
                    push(value)
        elif isinstance(item, list):
            for i, value in enumerate(item):
                if type(value) in _SCALARS:
                    continue
                if isinstance(value, str):
                    yield item, i
                elif isinstance(value, dict | list):
                    push(value)


# What JSON decodes to besides text and containers: passed over at once.
_SCALARS = frozenset({int, float, bool, type(None)})
