"""Fields vLLM accepts that the gateway never forwards, with the reason a client is told.

Any other undeclared field is refused too (``extra="forbid"``); these are listed so that the
refusal explains itself and so that the completeness test (tests/integration/
test_contract_completeness.py) can tell a field refused on purpose from one nobody looked at.
"""

from __future__ import annotations

_ENGINE_INTERNAL = "an engine-to-engine parameter (disaggregated serving, extensions)"
_RENDER_ONLY = "read only by vLLM's render endpoints, which the gateway does not expose"
_CHAT_EMBEDDINGS = "chat-form embeddings are not supported: send the text as 'input'"

_COMMON: dict[str, str] = {
    "use_beam_search": "beam search resubmits the prompt at every step, so its cost has no "
                       "bound the gateway can reserve",
    "best_of": "not supported by the engines (vLLM's V1 engine removed it)",
    "kv_transfer_params": _ENGINE_INTERNAL,
    "ec_transfer_params": _ENGINE_INTERNAL,
    "vllm_xargs": _ENGINE_INTERNAL,
    "routed_experts_prompt_start": "mixture-of-experts routing data is not returned",
    "return_token_offsets": _RENDER_ONLY,
    "mm_payload": _RENDER_ONLY,
    "return_mm_kwargs": _RENDER_ONLY,
}

UNSUPPORTED: dict[str, dict[str, str]] = {
    "chat": {**_COMMON},
    "completions": {
        **_COMMON,
        "max_completion_tokens": "vLLM's completions read only 'max_tokens'; send that",
        "tools": "tools are a chat feature: use /v1/chat/completions",
    },
    "embeddings": {
        "messages": _CHAT_EMBEDDINGS,
        "add_generation_prompt": _CHAT_EMBEDDINGS,
        "continue_final_message": _CHAT_EMBEDDINGS,
        "chat_template": _CHAT_EMBEDDINGS,
        "chat_template_kwargs": _CHAT_EMBEDDINGS,
        "media_io_kwargs": _CHAT_EMBEDDINGS,
        "normalize": "removed by vLLM; use 'use_activation'",
        "task": "not a client parameter",
        "session_id": "not read by the embeddings endpoint",
    },
}

# Fields of a chat message that vLLM accepts beyond each role's own.
MESSAGE_UNSUPPORTED: dict[str, str] = {
    "tools": "tools are declared once, in the request's 'tools'",
    "task": "a model-specific marker no served model reads",
    "audio": "audio is not supported",
    "author": "harmony-format messages are not supported",
    "channel": "harmony-format messages are not supported",
    "recipient": "harmony-format messages are not supported",
    "content_type": "harmony-format messages are not supported",
}

# Content part types vLLM parses that the gateway refuses.
PART_UNSUPPORTED: dict[str, str] = {
    kind: "only text content parts are supported (no served model reads media, and a URL in "
          "one would make the engine fetch it)"
    for kind in ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file",
                 "image_pil", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds")
} | {"tool_reference": "tool references are not supported",
     "input_text": "the engines' chat requests take text parts as type 'text'",
     "output_text": "the engines' chat requests take text parts as type 'text'"}

# Members of a content part, beyond those of the supported part types.
PART_KEY_UNSUPPORTED: dict[str, str] = {
    "uuid": "media item ids are not supported",
    "prompt_cache_breakpoint": "explicit prompt-cache breakpoints are not supported",
    "data": "prompt-embedding parts are not supported",
    "name": "tool references are not supported",
} | {kind: "media content parts are not supported" for kind in PART_UNSUPPORTED}

# Members of nested objects vLLM reads that the gateway refuses.
NESTED_UNSUPPORTED: dict[str, dict[str, str]] = {
    "tool": {"defer_loading": "deferred tool loading is not supported"},
    "function": {"defer_loading": "deferred tool loading is not supported"},
    "response_format_type": {"structural_tag": "structural-tag formats are not supported"},
    "structured_outputs": {"structural_tag": "structural tags are not supported"},
}
