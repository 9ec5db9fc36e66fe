"""What each field of a request is, to the gateway. Every field of every contract model carries
exactly one ``Kind`` in its ``Annotated`` metadata; a unit test refuses a model that does not.

- ``TEXT``: reaches the prompt or is read by the engine as text (messages in every form, tool
  definitions and schemas, response formats, stop strings, documents, the prompt, the input).
  Scanned for personal data, redacted, guarded, audited, counted in the cost bound.
- ``COST``: decides how much work the engine does (``n``, ``max_tokens``, the number of prompts,
  log probabilities, ``echo``). Bounded by the client's caps and reserved in its budget.
- ``SAFE``: a sampling or formatting parameter, type- and range-checked, forwarded as it is.
- ``CONTROL``: engine control (a chat template, template arguments, prompt embeddings, token-id
  prompts, scheduling priority). Refused unless the client's policy allows the field by name;
  when allowed, any text in it is scanned like ``TEXT``.
- ``ROUTING``: the model name, which the gateway resolves and rewrites.

``REVEALS`` marks a field that makes the engine return something the output filter cannot
redact soundly (the answer token by token, token ids, the rendered prompt): refused when the
client's policy redacts answers. It sits beside the field's kind.

This module imports nothing from the gateway: policies, protection and the tests read it.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    TEXT = "text"
    COST = "cost"
    SAFE = "safe"
    CONTROL = "control"
    ROUTING = "routing"


TEXT = Kind.TEXT
COST = Kind.COST
SAFE = Kind.SAFE
CONTROL = Kind.CONTROL
ROUTING = Kind.ROUTING


class _Reveals:
    """Marker: the answer to a request using this field carries unredactable data."""

    def __repr__(self) -> str:
        return "REVEALS"


REVEALS = _Reveals()

# Not fields but forms of a field that a policy may allow by name, like a control field:
# prompts and inputs given as token ids, which cannot be inspected as text.
TOKEN_ID_PROMPTS = "token_id_prompts"  # noqa: S105 (a field name)
