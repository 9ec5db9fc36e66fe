"""Print, as JSON, every request field vLLM accepts on the endpoints the gateway forwards.
Runs with the *engine* environment's Python (it imports vLLM); the gateway compares the output
with its request contract (``serving.contract.completeness``).

Usage: python vllm_fields.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any


def _model_fields(model: Any) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
    return names


def _typed_dict_keys(node: Any) -> set[str]:
    """Keys of every TypedDict (or pydantic model) in a union, at the top level."""
    keys: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        origin = typing.get_origin(item)
        if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
            stack.extend(typing.get_args(item) if origin is not typing.Annotated
                         else typing.get_args(item)[:1])
        elif hasattr(item, "__required_keys__"):
            keys |= set(item.__required_keys__) | set(item.__optional_keys__)
        elif hasattr(item, "model_fields"):
            keys |= _model_fields(item)
    return keys


def _literals(node: Any, key: str) -> set[str]:
    """The literal values of ``key`` across the TypedDicts of a union."""
    values: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        origin = typing.get_origin(item)
        if origin in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(item))
        elif hasattr(item, "__annotations__") and key in getattr(item, "__annotations__", {}):
            hint = typing.get_type_hints(item, include_extras=False).get(key)
            for arg in typing.get_args(hint) or ():
                for value in typing.get_args(arg) or (arg,):
                    if isinstance(value, str):
                        values.add(value)
    return values


def collect() -> dict[str, list[str]]:
    from vllm.entrypoints.generate.base import protocol as base
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionRequest,
        ChatCompletionToolsParam,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed import protocol as embed
    from vllm.renderers import chat_utils
    from vllm.sampling_params import RepetitionDetectionParams, StructuredOutputsParams

    embeddings: set[str] = set()
    for model in (embed.EmbeddingCompletionRequest, embed.EmbeddingChatRequest,
                  embed.EmbeddingBatchChatRequest, embed.EmbeddingChatInputRequest,
                  embed.EmbeddingBatchChatInputRequest):
        embeddings |= _model_fields(model)
    part_types = (set(chat_utils.MM_PARSER_MAP) | set(chat_utils.TEXT_PART_TYPES)
                  | _literals(chat_utils.ChatCompletionContentPartParam, "type"))
    part_keys = _typed_dict_keys(chat_utils.ChatCompletionContentPartParam)
    found = {
        "chat": _model_fields(ChatCompletionRequest),
        "completions": _model_fields(CompletionRequest),
        "embeddings": embeddings,
        "message": _typed_dict_keys(chat_utils.ChatCompletionMessageParam),
        "content_part_type": part_types,
        "content_part": part_keys,
        "tool": _model_fields(ChatCompletionToolsParam),
        "function": _model_fields(base.FunctionDefinition),
        "tool_choice": _model_fields(ChatCompletionNamedToolChoiceParam),
        "response_format": _model_fields(base.ResponseFormat),
        "response_format_type": {"structural_tag"} | set(
            typing.get_args(base.ResponseFormat.model_fields["type"].annotation)),
        "json_schema": _model_fields(base.JsonSchemaResponseFormat),
        "stream_options": _model_fields(base.StreamOptions),
        "structured_outputs": {f.name for f in dataclasses.fields(StructuredOutputsParams)
                               if not f.name.startswith("_")},
        "repetition_detection": {f.name for f in dataclasses.fields(RepetitionDetectionParams)
                                 if not f.name.startswith("_")},
    }
    return {key: sorted(value) for key, value in found.items()}


if __name__ == "__main__":
    json.dump(collect(), sys.stdout, indent=1)
    sys.stdout.write("\n")
