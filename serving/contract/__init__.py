"""The gateway's request contract: every field a client may send to an inference endpoint,
declared with what it is (``kinds``), validated once, and the only thing forwarded.

``parse`` validates the raw body into the endpoint's model in one pass; a field the contract
does not declare is refused with 400 ``unsupported_parameter`` (never dropped, never
forwarded). ``body`` re-serialises the validated model: the engine reads nothing the gateway
did not. This package imports nothing from the rest of the gateway but its errors and the
endpoint table (``domain.endpoints``).
"""

from __future__ import annotations

from functools import cache

from pydantic import BaseModel, ValidationError

from serving.contract.chat import ChatRequest
from serving.contract.completions import CompletionRequest
from serving.contract.embeddings import EmbeddingRequest
from serving.contract.kinds import CONTROL, TOKEN_ID_PROMPTS, Kind
from serving.contract.problems import refusal
from serving.contract.walk import kind_of, reveals
from serving.domain.endpoints import INFERENCE_PATHS

Request = ChatRequest | CompletionRequest | EmbeddingRequest
# The one upstream path per endpoint: nothing the client sends chooses the path or the query.
PATHS = INFERENCE_PATHS  # the engine path for each endpoint (domain.endpoints)
MODELS: dict[str, type[ChatRequest] | type[CompletionRequest] | type[EmbeddingRequest]] = {
    "chat": ChatRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest}

__all__ = ["MODELS", "PATHS", "ChatRequest", "CompletionRequest", "EmbeddingRequest", "Request",
           "body", "control_fields", "fields_of", "parse", "revealing_fields"]


def parse(endpoint: str, raw: bytes | str) -> Request:
    """Validate ``raw`` (JSON) as a request to ``endpoint``; raises ``InvalidRequest``."""
    model = MODELS[endpoint]
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise refusal(exc, endpoint) from None


def body(request: Request) -> bytes:
    """What goes to the engine: the fields the client (or the gateway) set, re-serialised."""
    return request.model_dump_json(exclude_unset=True, by_alias=True).encode()


@cache
def fields_of(model: type[BaseModel], kind: Kind) -> frozenset[str]:
    return frozenset(n for n in model.model_fields if kind_of(model, n) is kind)


@cache
def revealing_fields(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(n for n in model.model_fields if reveals(model, n))


@cache
def control_fields() -> frozenset[str]:
    """Every name a policy may allow: the control fields of every endpoint, and token-id
    prompts."""
    names = {TOKEN_ID_PROMPTS}
    for model in MODELS.values():
        names |= fields_of(model, CONTROL)
    return frozenset(names)
