"""Pieces shared by the endpoint contracts: the strict base model and the objects that more than
one endpoint accepts (stream options, response formats, structured outputs, tools).

Every model refuses a field it does not declare (``extra="forbid"``) and takes JSON types as
they are (``strict``: no "1" for 1, no 1 for true). Names and ranges follow what vLLM reads,
narrowed where a wider value buys a client nothing but a way around a policy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from serving.contract.kinds import COST, SAFE, TEXT

INT64 = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1


class Contract(BaseModel):
    """The base of every request model: undeclared fields are refused, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, serialize_by_alias=True,
                              validate_by_alias=True, validate_by_name=False)


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
# JSON values whose strings reach the engine as text (schemas, template arguments, documents).
JsonObject = dict[str, Any]
Stop = str | Annotated[list[str], Field(max_length=64)]
# Token ids as decimal strings, biases within OpenAI's range: nothing here is free text.
LogitBias = Annotated[
    dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")],
         Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=1024)]
CacheSalt = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,128}$")]


class StreamOptions(Contract):
    include_usage: Annotated[bool | None, SAFE] = None
    continuous_usage_stats: Annotated[bool | None, SAFE] = None


class JsonSchemaFormat(Contract):
    name: Annotated[str, TEXT, Field(max_length=256)]
    description: Annotated[str | None, TEXT] = None
    json_schema: Annotated[JsonObject | None, TEXT, Field(alias="schema")] = None
    strict: Annotated[bool | None, SAFE] = None


class TextFormat(Contract):
    type: Annotated[Literal["text"], SAFE]


class JsonObjectFormat(Contract):
    type: Annotated[Literal["json_object"], SAFE]


class JsonSchemaResponseFormat(Contract):
    type: Annotated[Literal["json_schema"], SAFE]
    json_schema: Annotated[JsonSchemaFormat, TEXT]


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat,
                           Field(discriminator="type")]


class StructuredOutputs(Contract):
    """Exactly one constraint: a JSON schema, a regular expression, a choice, a grammar, or any
    JSON object."""

    json_: Annotated[str | JsonObject | None, TEXT, Field(alias="json")] = None
    regex: Annotated[str | None, TEXT] = None
    choice: Annotated[list[str] | None, TEXT, Field(max_length=1024)] = None
    grammar: Annotated[str | None, TEXT] = None
    json_object: Annotated[bool | None, SAFE] = None
    disable_any_whitespace: Annotated[bool | None, SAFE] = None
    disable_additional_properties: Annotated[bool | None, SAFE] = None
    whitespace_pattern: Annotated[str | None, TEXT] = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class RepetitionDetection(Contract):
    max_pattern_size: Annotated[int, SAFE, Field(ge=0, le=1024)] = 0
    min_pattern_size: Annotated[int, SAFE, Field(ge=0, le=1024)] = 0
    min_count: Annotated[int, SAFE, Field(ge=0, le=1024)] = 0


class FunctionDefinition(Contract):
    name: Annotated[str, TEXT, Field(min_length=1, max_length=256)]
    description: Annotated[str | None, TEXT] = None
    parameters: Annotated[JsonObject | None, TEXT] = None
    strict: Annotated[bool | None, SAFE] = None


class Tool(Contract):
    type: Annotated[Literal["function"], SAFE]
    function: Annotated[FunctionDefinition, TEXT]


class NamedFunction(Contract):
    name: Annotated[str, TEXT, Field(min_length=1, max_length=256)]


class NamedToolChoice(Contract):
    type: Annotated[Literal["function"], SAFE]
    function: Annotated[NamedFunction, TEXT]


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class Sampling(Contract):
    """Sampling and decoding parameters that chat and completions share."""

    frequency_penalty: Annotated[float | None, SAFE, Field(ge=-2, le=2)] = None
    presence_penalty: Annotated[float | None, SAFE, Field(ge=-2, le=2)] = None
    logit_bias: Annotated[LogitBias | None, SAFE] = None
    seed: Annotated[int | None, SAFE, Field(ge=-INT64 - 1, le=INT64)] = None
    temperature: Annotated[float | None, SAFE, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, SAFE, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, SAFE, Field(ge=-1)] = None
    min_p: Annotated[float | None, SAFE, Field(ge=0, le=1)] = None
    repetition_penalty: Annotated[float | None, SAFE, Field(gt=0, le=10)] = None
    length_penalty: Annotated[float | None, SAFE, Field(ge=-10, le=10)] = None
    watermarking: Annotated[bool | None, SAFE] = None
    stop: Annotated[Stop | None, TEXT] = None
    stop_token_ids: Annotated[list[TokenId] | None, SAFE, Field(max_length=64)] = None
    bad_words: Annotated[list[str] | None, TEXT, Field(max_length=256)] = None
    allowed_token_ids: Annotated[list[TokenId] | None, SAFE] = None
    include_stop_str_in_output: Annotated[bool | None, SAFE] = None
    ignore_eos: Annotated[bool | None, SAFE] = None
    min_tokens: Annotated[int | None, SAFE, Field(ge=0)] = None
    skip_special_tokens: Annotated[bool | None, SAFE] = None
    spaces_between_special_tokens: Annotated[bool | None, SAFE] = None
    truncate_prompt_tokens: Annotated[int | None, SAFE, Field(ge=-1)] = None
    truncation_side: Annotated[Literal["left", "right"] | None, SAFE] = None
    add_special_tokens: Annotated[bool | None, SAFE] = None
    response_format: Annotated[ResponseFormat | None, TEXT] = None
    structured_outputs: Annotated[StructuredOutputs | None, TEXT] = None
    repetition_detection: Annotated[RepetitionDetection | None, SAFE] = None
    thinking_token_budget: Annotated[int | None, SAFE, Field(ge=-1)] = None
    stream: Annotated[bool | None, SAFE] = None
    stream_options: Annotated[StreamOptions | None, SAFE] = None
    stream_interval: Annotated[int | None, SAFE, Field(ge=1, le=1024)] = None
    cache_salt: Annotated[CacheSalt | None, SAFE] = None
    user: Annotated[str | None, TEXT, Field(max_length=256)] = None
    n: Annotated[int | None, COST, Field(ge=1, le=128)] = None

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self
