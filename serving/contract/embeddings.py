"""``POST /v1/embeddings``: an input, or a list of inputs, as text.

vLLM also accepts a chat conversation here (``messages``, or messages inside ``input``), rendered
by a chat template: not supported, which keeps one text form to inspect and bound. Inputs given
as token ids need the policy's ``token_id_prompts``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from serving.contract.common import INT64, CacheSalt, Contract, JsonObject, TokenId
from serving.contract.kinds import CONTROL, ROUTING, SAFE, TEXT

Inputs = Annotated[list[str], Field(min_length=1)]
TokenInput = Annotated[list[TokenId], Field(min_length=1)]
TokenInputs = Annotated[list[TokenInput], Field(min_length=1)]


class EmbeddingRequest(Contract):
    model: Annotated[str, ROUTING, Field(min_length=1, max_length=256)]
    input: Annotated[str | Inputs | TokenInput | TokenInputs, TEXT]
    user: Annotated[str | None, TEXT, Field(max_length=256)] = None
    encoding_format: Annotated[Literal["float", "base64"] | None, SAFE] = None
    dimensions: Annotated[int | None, SAFE, Field(ge=1, le=65536)] = None
    embed_dtype: Annotated[
        Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] | None, SAFE] = None
    endianness: Annotated[Literal["native", "big", "little"] | None, SAFE] = None
    use_activation: Annotated[bool | None, SAFE] = None
    truncate_prompt_tokens: Annotated[int | None, SAFE, Field(ge=-1)] = None
    truncation_side: Annotated[Literal["left", "right"] | None, SAFE] = None
    padding: Annotated[Literal["max_length", "do_not_pad"] | None, SAFE] = None
    add_special_tokens: Annotated[bool | None, SAFE] = None
    cache_salt: Annotated[CacheSalt | None, SAFE] = None
    mm_processor_kwargs: Annotated[JsonObject | None, CONTROL] = None
    priority: Annotated[int | None, CONTROL, Field(ge=-INT64 - 1, le=INT64)] = None
    request_id: Annotated[str | None, CONTROL, Field(max_length=256)] = None
