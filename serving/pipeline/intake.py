"""From a raw body to what is sent to the engine: validated against the contract, the model it
names resolved, the fields the client's policy lets through, caps applied, every text inspected,
and the body re-serialised from the contract's model (``prepare``).

Pure and synchronous: the route runs it inline for small bodies and in a worker thread for
large ones, so a big request never holds the event loop.

The model name is read from the validated body only (never a query parameter or header) and
matches a manifest name exactly: no case folding, no trimming, no aliases of aliases.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving import contract
from serving.admission import cost
from serving.admission.gate import Gatekeeper
from serving.contract import PATHS, ChatRequest, CompletionRequest, EmbeddingRequest, Request
from serving.contract.common import StreamOptions
from serving.contract.kinds import CONTROL, TOKEN_ID_PROMPTS
from serving.domain.manifest import ENDPOINTS_BY_TASK
from serving.domain.outcome import Decisions, RequestContext
from serving.domain.policy import Policy
from serving.domain.principal import Principal
from serving.errors import InvalidRequest, ModelNotFound, UnsupportedParameter
from serving.protection.protector import Inspection, Protector
from serving.upstream import split
from serving.upstream.affinity import Prefix
from serving.upstream.pool import EnginePool, ModelRoute, VersionGroup


@dataclass(slots=True)
class ParsedRequest:
    endpoint: str
    route: ModelRoute
    body: bytes  # what goes to the engine
    stream: bool
    client_wants_usage: bool
    chunk_usage: str = "keep"  # what the relay does with per-event usage: keep, null, drop
    pinned: VersionGroup | None = None  # a pinned version (``model@version``)
    n: int = 1  # choices per prompt: a stream's choice index // n is its prompt
    affinity: Prefix | None = None  # the prompt's prefix, for prefix affinity
    request: Request | None = None  # as validated: a fallback model's body is made from it
    bucket: int | None = None  # the conversation's version bucket, when versions split traffic

    def body_for(self, model: str) -> bytes:
        """The same request for another model (a fallback)."""
        assert self.request is not None
        request = self.request.model_copy()
        request.model = model
        return contract.body(request)


def resolve_model(model: str, pool: EnginePool) -> tuple[ModelRoute, VersionGroup | None]:
    """The model route the request names, and the version when it pins one
    (``demo-chat@v1``)."""
    alias, at, version = model.partition("@")
    route = pool.route(alias)
    pinned = None
    if route is not None and at:
        pinned = route.version(version)
        if pinned is None:
            route = None
    if route is None:
        # The name is the client's own string; it is safe to say which model, trimmed.
        raise ModelNotFound(f"The model '{model[:100]}' does not exist or you do not have "
                            "access to it.", param="model")
    return route, pinned


def check_endpoint(endpoint: str, route: ModelRoute) -> None:
    """Runs after the caller's policy allowed the model, so a refusal reveals nothing."""
    if endpoint not in ENDPOINTS_BY_TASK[route.task]:
        raise InvalidRequest(
            f"The model '{route.name}' does not support {PATHS[endpoint]}.", param="model",
            code="unsupported_endpoint")


def check_fields(request: Request, policy: Policy) -> None:
    """Engine control only where the policy allows it by name; nothing the gateway cannot
    inspect when the policy inspects prompts; nothing it cannot redact when it redacts answers.
    """
    model = type(request)
    allowed = frozenset(policy.engine_control)
    for name in sorted(contract.fields_of(model, CONTROL) & request.model_fields_set):
        if getattr(request, name) is not None and name not in allowed:
            raise UnsupportedParameter(
                f"'{name}' is engine control; this client's policy does not allow it "
                "(engine_control).", param=name)
    inspects = policy.pii.input != "allow" or policy.audit.content != "none"
    opaque = _opaque_prompt(request)
    if opaque is not None:
        if opaque == TOKEN_ID_PROMPTS and TOKEN_ID_PROMPTS not in allowed:
            raise UnsupportedParameter(
                "Prompts given as token ids are engine control; this client's policy does not "
                "allow them (engine_control: token_id_prompts).", param=_prompt_param(request))
        if inspects:
            raise InvalidRequest(
                "This client's prompts are inspected for personal data: send text, not token "
                "ids or embeddings.", param=_prompt_param(request), code="unsupported_prompt")
    if policy.pii.output == "redact":
        for name in contract.revealing_fields(model):
            value = getattr(request, name)
            if value:  # a flag set, a count above 0, a non-empty list
                raise UnsupportedParameter(
                    f"'{name}' returns the answer or the prompt token by token, which cannot "
                    "be redacted soundly; this client's policy redacts answers.", param=name)


def _prompt_param(request: Request) -> str:
    return "input" if isinstance(request, EmbeddingRequest) else "prompt"


def _opaque_prompt(request: Request) -> str | None:
    """``token_id_prompts`` or ``prompt_embeds`` when the prompt is not text."""
    if isinstance(request, ChatRequest):
        return None
    if isinstance(request, CompletionRequest) and request.prompt_embeds is not None:
        return "prompt_embeds"
    value = request.prompt if isinstance(request, CompletionRequest) else request.input
    if isinstance(value, str) or isinstance(value[0], str):
        return None
    return TOKEN_ID_PROMPTS


def finish(request: Request, endpoint: str, route: ModelRoute,
           pinned: VersionGroup | None) -> ParsedRequest:
    """Set what the gateway owns (the model's name as the engine serves it, usage on every
    streamed event) and serialise."""
    request.model = route.name  # the engine serves every version under the alias
    if isinstance(request, EmbeddingRequest):
        return ParsedRequest(endpoint, route, contract.body(request), False, False,
                             pinned=pinned, request=request)
    stream = bool(request.stream)
    wants_usage = False
    chunk_usage = "keep"
    if stream:
        options = request.stream_options
        wants_usage = bool(options and options.include_usage)
        wants_continuous = wants_usage and bool(options and options.continuous_usage_stats)
        if not wants_continuous:
            chunk_usage = "null" if wants_usage else "drop"
            # Usage on every event, so that every token streamed is counted even when the
            # client goes away mid-stream; what the client did not ask for is removed.
            request.stream_options = StreamOptions(include_usage=True,
                                                   continuous_usage_stats=True)
    body = contract.body(request)
    keys = Prefix(body) if route.prefixes is not None else None
    return ParsedRequest(endpoint, route, body, stream, wants_usage, chunk_usage, pinned,
                         request.n or 1, keys, request)


@dataclass(slots=True)
class Prepared:
    request: Request
    parsed: ParsedRequest
    inspection: Inspection
    bounds: list[int]  # each prompt's bound in tokens (cost.prompt_bounds)


def prepare(raw: bytes, endpoint: str, principal: Principal, policy: Policy, pool: EnginePool,
            gate: Gatekeeper, protector: Protector, ctx: RequestContext, decisions: Decisions,
            deadline: float | None) -> Prepared:
    """Everything between reading the body and admission; raises ``GatewayError``. Writes the
    model, whether it streams and the text for the audit record into ``ctx``, and the guards'
    decisions into ``decisions``, as soon as each is known (a refusal is recorded with
    them)."""
    request = contract.parse(endpoint, raw)
    route, pinned = resolve_model(request.model, pool)
    gate.check_model(principal, policy, route, request.model)
    ctx.model = route.name
    check_endpoint(endpoint, route)
    check_fields(request, policy)
    cost.apply_caps(policy, request, route.max_model_len)
    inspection = protector.inspect(policy, request, decisions, deadline)
    ctx.request_text = inspection.request_text
    parsed = finish(request, endpoint, route, pinned)
    if pinned is None and route.split():
        parsed.bucket = split.bucket(ctx.client_id, request)
    ctx.stream = parsed.stream
    bounds = cost.prompt_bounds(request, len(parsed.body), route.max_model_len)
    return Prepared(request, parsed, inspection, bounds)
