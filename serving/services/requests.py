"""Validating an inference request body: only the fields the gateway acts on.

The rest of the body passes through untouched. Errors name the parameter at fault and never
quote its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from serving.errors import InvalidRequest, ModelNotFound
from serving.services.engines import EnginePool, EngineState, ModelRoute
from serving.storage.manifests import ENDPOINTS_BY_TASK

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


@dataclass(slots=True)
class ParsedRequest:
    endpoint: str
    route: ModelRoute
    body: bytes  # what goes to the engine
    stream: bool
    client_wants_usage: bool
    chunk_usage: str = "keep"  # what the relay does with per-event usage: keep, null, drop
    engine: EngineState | None = None  # a pinned version (``model@version``)


def decode(raw: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload


def resolve_model(payload: dict[str, Any],
                  pool: EnginePool) -> tuple[ModelRoute, EngineState | None]:
    """The model route the request names, and the engine when it pins a version
    (``demo-chat@v1``). Names match exactly: no case folding, no trimming, no aliases of aliases.
    """
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    alias, at, version = model.partition("@")
    route = pool.route(alias)
    engine = None
    if route is not None and at:
        engine = next((e for e in route.engines if e.deployment.version.name == version), None)
        if engine is None:
            route = None
    if route is None:
        # The name is the client's own string; it is safe to say which model, trimmed.
        raise ModelNotFound(f"The model '{model[:100]}' does not exist or you do not have "
                            "access to it.", param="model")
    return route, engine


def validate(payload: dict[str, Any], raw: bytes, endpoint: str, route: ModelRoute,
             engine: EngineState | None = None, changed: bool = False) -> ParsedRequest:
    """Check the fields the gateway acts on; return what to send to the engine, for ``engine``
    when the request pins a version. ``changed``: the payload was modified (a policy default)
    and must be re-encoded.
    Runs after the caller's policy allowed the model, so a refusal here reveals nothing."""
    if endpoint not in ENDPOINTS_BY_TASK[route.task]:
        raise InvalidRequest(
            f"The model '{route.name}' does not support {PATHS[endpoint]}.", param="model",
            code="unsupported_endpoint")
    if engine is not None:
        payload["model"] = route.name  # the engine serves every version under the alias
        changed = True
    _check_shape(payload, endpoint)
    _check_max_tokens(payload, route)

    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if endpoint == "embeddings" and stream:
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream")

    wants_usage = False
    chunk_usage = "keep"
    if stream:
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
        wants_usage = bool(options and options.get("include_usage") is True)
        wants_continuous = wants_usage and bool(options and
                                                options.get("continuous_usage_stats") is True)
        if not wants_continuous:
            chunk_usage = "null" if wants_usage else "drop"
            # Usage on every event, so that every token streamed is counted even when the
            # client goes away mid-stream; what the client did not ask for is removed.
            payload["stream_options"] = {**(options or {}), "include_usage": True,
                                         "continuous_usage_stats": True}
            changed = True
    body = orjson.dumps(payload) if changed else raw
    return ParsedRequest(endpoint, route, body, stream, wants_usage, chunk_usage, engine)


def _check_shape(payload: dict[str, Any], endpoint: str) -> None:
    if endpoint == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' is required and must be a non-empty array.",
                                 param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with a 'role'.",
                                     param=f"messages[{i}]")
    elif endpoint == "completions":
        prompt = payload.get("prompt")
        if prompt is None or (not isinstance(prompt, str | list)) or prompt == []:
            raise InvalidRequest("'prompt' is required.", param="prompt")
    elif endpoint == "embeddings":
        value = payload.get("input")
        if value is None or (not isinstance(value, str | list)) or value == []:
            raise InvalidRequest("'input' is required.", param="input")


def _check_max_tokens(payload: dict[str, Any], route: ModelRoute) -> None:
    for param in ("max_tokens", "max_completion_tokens"):
        value = payload.get(param)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{param}' must be a positive integer.", param=param)
        if value > route.max_model_len:
            raise InvalidRequest(
                f"'{param}' is {value}, but the model '{route.name}' allows at most "
                f"{route.max_model_len} tokens (prompt and completion together).",
                param=param, code="max_tokens_exceeded")
