"""The most a request can cost, computed before any engine sees it, and the caps that bound it.

What vLLM does with a request, and so what the engine's own token counters will show:
- each prompt (a completions list holds several; chat has one) is answered ``n`` times, and
  the engine processes the prompt once per choice (its prompt counter grows by n x prompt);
- a choice is at most ``max_tokens`` tokens (chat: ``max_completion_tokens`` first), and prompt
  plus completion never exceed the model's context (``max_model_len``): the engine refuses or
  truncates beyond it;
- a prompt is at most one token per byte of its text (byte-level and WordPiece tokenizers
  alike), plus the special tokens around it and, for chat, the template's own text.

So the reservation is the sum over prompts of n x min(prompt bound + max_tokens, max_model_len):
never below what the engine will count. Where the byte bound is loose and a cap would refuse,
the caller may replace a prompt's bound with the engine's exact count (``/tokenize``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from serving.contract import ChatRequest, CompletionRequest, EmbeddingRequest, Request
from serving.domain.policy import Policy
from serving.errors import InvalidRequest

# Special tokens a tokenizer adds around one prompt or input (BOS/EOS, [CLS]/[SEP]).
SPECIAL_TOKENS = 8
# The chat template's own text around the messages (role markers, a fixed preamble, the tool
# instructions), beyond the request's JSON, which already outweighs its per-message markers.
TEMPLATE_TOKENS = 128
DEFAULT_COMPLETIONS_MAX_TOKENS = 16  # what vLLM's completions use when none is given


@dataclass(frozen=True, slots=True)
class Cost:
    """``tokens``: the most the request can use, as the engine counts; ``prompt``: its prompts'
    bound, counted once (what an abandoned stream is charged before the first token);
    ``choices``: how many answers it produces."""

    tokens: int
    prompt: int
    choices: int


def prompt_bounds(request: Request, body_len: int, max_model_len: int) -> list[int]:
    """Each prompt's bound in tokens: its text's bytes (token ids: their count) plus special
    tokens; the whole body plus the template's text for chat. Clamped to the context."""
    if isinstance(request, ChatRequest):
        bounds = [body_len + TEMPLATE_TOKENS]
    else:
        value = request.prompt if isinstance(request, CompletionRequest) else request.input
        extra = SPECIAL_TOKENS
        if isinstance(request, CompletionRequest) and request.suffix:
            extra += len(request.suffix.encode())
        if isinstance(value, str):
            bounds = [len(value.encode()) + extra]
        elif value and isinstance(value[0], str):
            bounds = [len(p.encode()) + extra for p in value if isinstance(p, str)]
        elif value and isinstance(value[0], int):
            bounds = [len(value)]  # token ids: exactly what the engine reads
        else:
            bounds = [len(p) for p in value]  # type: ignore[arg-type]
    return [min(b, max_model_len) for b in bounds]


def prompts_of(request: Request) -> int:
    if isinstance(request, ChatRequest):
        return 1
    value = request.prompt if isinstance(request, CompletionRequest) else request.input
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return 1
    return len(value)


def apply_caps(policy: Policy, request: Request, max_model_len: int) -> None:
    """Enforce the caps that always hold (n, prompts, messages, max_tokens) and fill in
    ``max_tokens`` from the cap (or vLLM's completions default) when the request gives none,
    so the engine never generates more than was reserved."""
    caps = policy.caps
    count = prompts_of(request)
    if count > caps.prompts:
        param = "input" if isinstance(request, EmbeddingRequest) else "prompt"
        raise InvalidRequest(f"{count} prompts in one request; this client may send at most "
                             f"{caps.prompts}.", param=param, code="too_many_prompts")
    if isinstance(request, EmbeddingRequest):
        return
    n = request.n or 1
    if n > caps.n:
        raise InvalidRequest(f"'n' is {n}; this client may ask for at most {caps.n}.",
                             param="n", code="n_exceeded")
    if isinstance(request, ChatRequest):
        if caps.messages is not None and len(request.messages) > caps.messages:
            raise InvalidRequest(f"{len(request.messages)} messages; this client may send at "
                                 f"most {caps.messages}.", param="messages",
                                 code="too_many_messages")
        param = "max_completion_tokens" if request.max_completion_tokens is not None \
            else "max_tokens"
    else:
        param = "max_tokens"
    asked = request.output_tokens()
    if asked is not None and asked > max_model_len:
        raise InvalidRequest(
            f"'{param}' is {asked}, but this model allows at most {max_model_len} tokens "
            "(prompt and completion together).", param=param, code="max_tokens_exceeded")
    if asked is None:
        default = caps.max_tokens if caps.max_tokens is not None else (
            DEFAULT_COMPLETIONS_MAX_TOKENS if isinstance(request, CompletionRequest) else None)
        if default is not None:
            request.max_tokens = min(default, max_model_len)
    elif caps.max_tokens is not None and asked > caps.max_tokens:
        raise InvalidRequest(f"'{param}' is {asked}; this client may ask for at most "
                             f"{caps.max_tokens}.", param=param, code="max_tokens_exceeded")


def bound(request: Request, prompt_tokens: list[int], max_model_len: int) -> Cost:
    """The cost of ``request`` given each prompt's bound (or exact count)."""
    if isinstance(request, EmbeddingRequest):
        total = sum(prompt_tokens)
        return Cost(total, total, len(prompt_tokens))
    n = request.n or 1
    asked = request.output_tokens()
    # No max_tokens (chat without a cap): the engine may fill the context.
    completion = max(asked, 1) if asked is not None else max_model_len
    tokens = sum(n * min(p + completion, max_model_len) for p in prompt_tokens)
    return Cost(tokens, sum(prompt_tokens), n * len(prompt_tokens))


def check_request_tokens(policy: Policy, cost: Cost) -> None:
    cap = policy.caps.request_tokens
    if cap is not None and cost.tokens > cap:
        raise InvalidRequest(
            f"This request could use up to {cost.tokens} tokens ({cost.choices} answer(s), "
            f"prompts up to {cost.prompt} tokens); this client may reserve at most {cap} per "
            "request. Lower max_tokens, n or the number of prompts.", param="max_tokens",
            code="request_too_costly")


# What vLLM's /tokenize reads for chat: a chat request holding anything else the template may
# render (documents, a response format) cannot be counted there, and keeps its byte bound.
_TOKENIZE_CHAT = {"model", "messages", "tools", "chat_template", "chat_template_kwargs",
                  "add_generation_prompt", "continue_final_message", "add_special_tokens"}


def tokenize_bodies(request: Request, indices: Iterable[int]) -> dict[int, bytes]:
    """``/tokenize`` bodies that count prompts ``indices`` exactly, for those that can be."""
    if isinstance(request, ChatRequest):
        if request.documents or request.response_format is not None:
            return {}
        chat = request.model_dump(include=_TOKENIZE_CHAT, exclude_unset=True, by_alias=True)
        return {0: orjson.dumps(chat)}
    if isinstance(request, EmbeddingRequest):
        return {}
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    out: dict[int, bytes] = {}
    for i in indices:
        prompt = prompts[i]
        if isinstance(prompt, str):
            fields: dict[str, object] = {"model": request.model, "prompt": prompt}
            if request.add_special_tokens is not None:
                fields["add_special_tokens"] = request.add_special_tokens
            out[i] = orjson.dumps(fields)
    return out
