"""Whether the contract covers every field vLLM accepts: each one declared (with its kind) or
refused on purpose (``unsupported``). A field the engine reads that the contract has never
looked at is a gap; an engine upgrade that adds one fails the check instead of opening a hole.

``vllm`` is what ``serving/engines/vllm_fields.py`` prints in the engine environment.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

from pydantic import BaseModel

from serving.contract.chat import MESSAGE_TYPES, ChatRequest, RefusalPart, TextPart, ThinkingPart
from serving.contract.common import (
    FunctionDefinition,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaResponseFormat,
    NamedToolChoice,
    RepetitionDetection,
    StreamOptions,
    StructuredOutputs,
    TextFormat,
    Tool,
)
from serving.contract.completions import CompletionRequest
from serving.contract.embeddings import EmbeddingRequest
from serving.contract.unsupported import (
    MESSAGE_UNSUPPORTED,
    NESTED_UNSUPPORTED,
    PART_KEY_UNSUPPORTED,
    PART_UNSUPPORTED,
    UNSUPPORTED,
)

_PARTS = (TextPart, RefusalPart, ThinkingPart)


def _names(*models: type[BaseModel]) -> set[str]:
    out: set[str] = set()
    for model in models:
        for name, info in model.model_fields.items():
            out.add(info.alias or name)
    return out


def _literal_values(*models: type[BaseModel]) -> set[str]:
    out: set[str] = set()
    for model in models:
        out |= set(typing.get_args(model.model_fields["type"].annotation))
    return out


def coverage() -> dict[str, set[str]]:
    """Per object vLLM reads, the names the contract declares or refuses on purpose."""
    return {
        "chat": _names(ChatRequest) | set(UNSUPPORTED["chat"]),
        "completions": _names(CompletionRequest) | set(UNSUPPORTED["completions"]),
        "embeddings": _names(EmbeddingRequest) | set(UNSUPPORTED["embeddings"]),
        "message": _names(*MESSAGE_TYPES.values()) | set(MESSAGE_UNSUPPORTED),
        "content_part_type": _literal_values(*_PARTS) | set(PART_UNSUPPORTED),
        "content_part": _names(*_PARTS) | set(PART_KEY_UNSUPPORTED),
        "tool": _names(Tool) | set(NESTED_UNSUPPORTED["tool"]),
        "function": _names(FunctionDefinition) | set(NESTED_UNSUPPORTED["function"]),
        "tool_choice": _names(NamedToolChoice),
        "response_format": _names(JsonSchemaResponseFormat, TextFormat),
        "response_format_type": _literal_values(TextFormat, JsonObjectFormat,
                                                JsonSchemaResponseFormat)
        | set(NESTED_UNSUPPORTED["response_format_type"]),
        "json_schema": _names(JsonSchemaFormat),
        "stream_options": _names(StreamOptions),
        "structured_outputs": _names(StructuredOutputs)
        | set(NESTED_UNSUPPORTED["structured_outputs"]),
        "repetition_detection": _names(RepetitionDetection),
    }


def gaps(vllm: Mapping[str, list[str]],
         covered: Mapping[str, set[str]] | None = None) -> list[str]:
    """``object.field`` for every field vLLM accepts that the contract neither declares nor
    refuses; an object the contract does not know at all is a gap too."""
    covered = coverage() if covered is None else covered
    out: list[str] = []
    for obj, fields in sorted(vllm.items()):
        known = covered.get(obj)
        if known is None:
            out.append(f"{obj} (an object the contract does not cover)")
            continue
        out.extend(f"{obj}.{name}" for name in fields if name not in known)
    return out
