"""An engine's 4xx refusal, told to the client in the gateway's own words.

vLLM's error messages quote the values they refuse (a regular expression, a stop string, the
offending field's value): passed through, they would hand back text the output filter never
saw. So the engine's message is read only for the numbers in a few known refusals, and the
client gets a message written here; ``param`` is kept only when it names a contract field.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson

from serving.contract.problems import declared_names
from serving.errors import error_bytes

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str], str | None, str]
_RULES: tuple[_Rule, ...] = (
    (re.compile(r"max_tokens=(\d+) cannot be greater than max_model_len=(\d+)"),
     lambda m: f"'max_tokens' is {m[1]}; this model allows at most {m[2]} tokens (prompt and "
               "completion together).", "max_tokens", "max_tokens_exceeded"),
    (re.compile(r"maximum context length is (\d+) tokens\. However, your prompt contains at "
                r"least (\d+)"),
     lambda m: f"The prompt is at least {m[2]} tokens; this model's context is {m[1]} tokens.",
     None, "context_length_exceeded"),
    (re.compile(r"maximum context length is (\d+) tokens\. However, your prompt contains "
                r"(\d+) characters"),
     lambda m: f"The prompt is {m[2]} characters, more than this model's context of {m[1]} "
               "tokens can hold.", None, "context_length_exceeded"),
    (re.compile(r"maximum context length is (\d+) tokens\. However, you requested (\d+)"),
     lambda m: f"The prompt and max_tokens together ({m[2]} tokens) exceed this model's "
               f"context ({m[1]} tokens).", None, "context_length_exceeded"),
    (re.compile(r"out-of-vocab token ids\. Vocabulary size: (\d+)"),
     lambda m: f"A token id is outside this model's vocabulary ({m[1]} tokens).", None,
     "invalid_token_id"),
    (re.compile(r"min_tokens must be less than or equal to max_tokens"),
     lambda m: "'min_tokens' must not exceed 'max_tokens'.", "min_tokens", "invalid_parameter"),
    (re.compile(r"(?i)grammar|structured output|regex|json schema|xgrammar|guided"),
     lambda m: "The engine could not compile the structured-output constraint (a schema, a "
               "regular expression, a grammar or a choice).", None, "invalid_structured_output"),
    (re.compile(r"tool choice requires --enable-auto-tool-choice"),
     lambda m: "This model's engine does not choose tools by itself: set 'tool_choice' to "
               "'none' or name a function.", "tool_choice", "tool_choice_unsupported"),
    (re.compile(r"Matryoshka|dimensions"),
     lambda m: "This model does not support 'dimensions'.", "dimensions", "invalid_parameter"),
)


def client_error(body: bytes, status: int, prompt_param: str) -> bytes:
    """The OpenAI-shaped error to send for an engine's ``status`` refusal with ``body``."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        err = payload if isinstance(payload, dict) else {}
    message = err.get("message")
    param = err.get("param")
    param = param if isinstance(param, str) and param in declared_names() else None
    if isinstance(message, str):
        for pattern, write, fixed_param, code in _RULES:
            match = pattern.search(message)
            if match:
                where = fixed_param or (prompt_param if code == "context_length_exceeded"
                                        else param)
                return error_bytes(write(match), "invalid_request_error", where, code)
    return error_bytes(f"The engine refused the request ({status}).", "invalid_request_error",
                       param, f"engine_{status}")
