"""``POST /v1/completions``: a prompt, or a list of prompts (each answered ``n`` times), and the
parameters vLLM reads beside it.

vLLM's completions read ``max_tokens`` only (``max_completion_tokens`` is not a field there, so it
is refused here rather than ignored by the engine while the gateway reserved by it). Prompts given
as token ids cannot be inspected: the policy must allow them by name (``token_id_prompts``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from serving.contract.common import INT64, Sampling, TokenId
from serving.contract.kinds import CONTROL, COST, REVEALS, ROUTING, SAFE, TEXT

Prompts = Annotated[list[str], Field(min_length=1)]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]
TokenPrompts = Annotated[list[TokenPrompt], Field(min_length=1)]


class CompletionRequest(Sampling):
    model: Annotated[str, ROUTING, Field(min_length=1, max_length=256)]
    prompt: Annotated[str | Prompts | TokenPrompt | TokenPrompts, TEXT]
    suffix: Annotated[str | None, TEXT] = None
    max_tokens: Annotated[int | None, COST, Field(ge=0)] = None
    echo: Annotated[bool | None, COST] = None
    logprobs: Annotated[int | None, COST, REVEALS, Field(ge=0, le=20)] = None
    prompt_logprobs: Annotated[int | None, COST, REVEALS, Field(ge=0, le=20)] = None
    logprob_token_ids: Annotated[list[TokenId] | None, COST, REVEALS,
                                 Field(max_length=20)] = None
    return_tokens_as_token_ids: Annotated[bool | None, SAFE, REVEALS] = None
    return_token_ids: Annotated[bool | None, SAFE, REVEALS] = None
    prompt_embeds: Annotated[str | Annotated[list[str], Field(min_length=1)] | None,
                             CONTROL] = None
    priority: Annotated[int | None, CONTROL, Field(ge=-INT64 - 1, le=INT64)] = None
    request_id: Annotated[str | None, CONTROL, Field(max_length=256)] = None
    session_id: Annotated[str | None, CONTROL, Field(max_length=256)] = None

    def output_tokens(self) -> int | None:
        # vLLM's default is 16; the gateway always sends a value (the cap, or 16).
        return self.max_tokens

