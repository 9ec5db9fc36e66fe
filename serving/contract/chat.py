"""``POST /v1/chat/completions``: the messages in every form the chat template renders, and the
parameters vLLM reads beside them.

Roles are a closed set; a message carries only the fields of its role; content parts are text
of a kind the template renders (``text``, ``refusal``, ``thinking``). Images, audio, video,
files, embeddings and tool references are refused: no model served here reads them, and a URL
in them would make the engine fetch it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field

from serving.contract.common import (
    INT64,
    Contract,
    JsonObject,
    Sampling,
    TokenId,
    Tool,
    ToolChoice,
)
from serving.contract.kinds import CONTROL, COST, REVEALS, ROUTING, SAFE, TEXT
from serving.contract.tagged import tagged


class TextPart(Contract):
    type: Annotated[Literal["text"], SAFE]
    text: Annotated[str, TEXT]


class RefusalPart(Contract):
    type: Annotated[Literal["refusal"], SAFE]
    refusal: Annotated[str, TEXT]


class ThinkingPart(Contract):
    type: Annotated[Literal["thinking"], SAFE]
    thinking: Annotated[str, TEXT]
    closed: Annotated[bool | None, SAFE] = None


if TYPE_CHECKING:
    ContentPart = TextPart | RefusalPart | ThinkingPart
else:
    ContentPart = tagged("type", {"text": TextPart, "refusal": RefusalPart,
                                  "thinking": ThinkingPart})
Content = str | Annotated[list[ContentPart], Field(max_length=4096)]
Name = Annotated[str | None, TEXT, Field(max_length=256)]


class SystemMessage(Contract):
    role: Annotated[Literal["system"], SAFE]
    content: Annotated[Content, TEXT]
    name: Name = None


class DeveloperMessage(Contract):
    role: Annotated[Literal["developer"], SAFE]
    content: Annotated[Content, TEXT]
    name: Name = None


class UserMessage(Contract):
    role: Annotated[Literal["user"], SAFE]
    content: Annotated[Content, TEXT]
    name: Name = None


class CalledFunction(Contract):
    name: Annotated[str, TEXT, Field(max_length=256)]
    arguments: Annotated[str, TEXT]


class ToolCall(Contract):
    id: Annotated[str, TEXT, Field(max_length=256)]
    type: Annotated[Literal["function"], SAFE]
    function: Annotated[CalledFunction, TEXT]


class AssistantMessage(Contract):
    role: Annotated[Literal["assistant"], SAFE]
    content: Annotated[Content | None, TEXT] = None
    name: Name = None
    refusal: Annotated[str | None, TEXT] = None
    tool_calls: Annotated[list[ToolCall] | None, TEXT, Field(max_length=1024)] = None
    function_call: Annotated[CalledFunction | None, TEXT] = None
    reasoning: Annotated[str | None, TEXT] = None
    reasoning_content: Annotated[str | None, TEXT] = None


class ToolMessage(Contract):
    role: Annotated[Literal["tool"], SAFE]
    content: Annotated[Content, TEXT]
    tool_call_id: Annotated[str, TEXT, Field(max_length=256)]


class FunctionMessage(Contract):
    role: Annotated[Literal["function"], SAFE]
    content: Annotated[str | None, TEXT]
    name: Annotated[str, TEXT, Field(max_length=256)]


MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    "system": SystemMessage, "developer": DeveloperMessage, "user": UserMessage,
    "assistant": AssistantMessage, "tool": ToolMessage, "function": FunctionMessage}
if TYPE_CHECKING:
    Message = (SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage
               | FunctionMessage)
else:
    Message = tagged("role", MESSAGE_TYPES)
ROLES = tuple(MESSAGE_TYPES)
# Whose words these are: the operator's instructions, not scored as injection attempts.
INSTRUCTION_ROLES = frozenset({"system", "developer"})


class ChatRequest(Sampling):
    model: Annotated[str, ROUTING, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], TEXT, Field(min_length=1)]
    max_tokens: Annotated[int | None, COST, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, COST, Field(ge=1)] = None
    logprobs: Annotated[bool | None, COST, REVEALS] = None
    top_logprobs: Annotated[int | None, COST, REVEALS, Field(ge=0, le=20)] = None
    prompt_logprobs: Annotated[int | None, COST, REVEALS, Field(ge=0, le=20)] = None
    logprob_token_ids: Annotated[list[TokenId] | None, COST, REVEALS,
                                 Field(max_length=20)] = None
    return_tokens_as_token_ids: Annotated[bool | None, SAFE, REVEALS] = None
    return_token_ids: Annotated[bool | None, SAFE, REVEALS] = None
    return_prompt_text: Annotated[bool | None, SAFE, REVEALS] = None
    echo: Annotated[bool | None, COST] = None
    tools: Annotated[list[Tool] | None, TEXT, Field(max_length=256)] = None
    tool_choice: Annotated[ToolChoice | None, TEXT] = None
    parallel_tool_calls: Annotated[bool | None, SAFE] = None
    reasoning_effort: Annotated[
        Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None, SAFE] = None
    include_reasoning: Annotated[bool | None, SAFE] = None
    add_generation_prompt: Annotated[bool | None, SAFE] = None
    continue_final_message: Annotated[bool | None, SAFE] = None
    documents: Annotated[list[dict[str, str]] | None, TEXT, Field(max_length=1024)] = None
    chat_template: Annotated[str | None, CONTROL] = None
    chat_template_kwargs: Annotated[JsonObject | None, CONTROL] = None
    media_io_kwargs: Annotated[JsonObject | None, CONTROL] = None
    mm_processor_kwargs: Annotated[JsonObject | None, CONTROL] = None
    priority: Annotated[int | None, CONTROL, Field(ge=-INT64 - 1, le=INT64)] = None
    request_id: Annotated[str | None, CONTROL, Field(max_length=256)] = None
    session_id: Annotated[str | None, CONTROL, Field(max_length=256)] = None

    def output_tokens(self) -> int | None:
        """The most tokens per choice, as vLLM reads it: max_completion_tokens first."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
