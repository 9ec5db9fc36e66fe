"""Client policies: the schema of ``config/policies.yaml`` (``storage.policies`` reads the file).

A policy says what a client may do: which models (manifest names), which endpoints (scopes),
caps on a request, rate limits, and token budgets. Loading checks every field, refuses unknown
ones, and names the file, the policy and the field at fault.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.domain.endpoints import ADMIN, INFERENCE

Scope = Literal["chat", "completions", "embeddings", "models", "admin"]
SCOPES: tuple[str, ...] = ("chat", "completions", "embeddings", "models", "admin")
INFERENCE_SCOPES = INFERENCE | {"models"}
assert set(SCOPES) == INFERENCE_SCOPES | {ADMIN}  # the scopes are the endpoints a policy opens
ANY_MODEL = "*"
AuditContent = Literal["none", "redacted", "encrypted"]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


GuardMode = Literal["off", "flag", "block"]


class Caps(_Strict):
    """Bounds on one request (OWASP LLM10, unbounded consumption). ``max_tokens``, ``n``,
    ``prompts``, ``messages``, ``body_bytes`` and ``request_tokens`` are always enforced: they
    bound what the gateway reads and what the budget reserves. ``mode`` governs the others
    (``logprobs``, ``stop``): ``block`` refuses a request beyond them (400), ``flag`` lets it
    through and records it, ``off`` ignores them."""

    mode: GuardMode = "block"
    max_tokens: int | None = Field(default=None, ge=1, description="Largest max_tokens; also the "
                                   "default when a request gives none.")
    n: int = Field(default=1, ge=1, le=128, description="Choices per prompt")
    prompts: int = Field(default=16, ge=1, le=4096, description="Prompts in one completions "
                         "request, inputs in one embeddings request")
    request_tokens: int | None = Field(
        default=None, ge=1, description="The most tokens one request may reserve: every "
        "prompt's bound plus n times max_tokens, per prompt")
    best_of: int = Field(default=1, ge=1, le=128, description="Unused: the engines no longer "
                         "accept best_of, and the gateway refuses it. Kept so that older policy "
                         "files still load.")
    logprobs: int = Field(default=20, ge=0, le=20, description="Largest logprobs / "
                          "top_logprobs; 0: no log probabilities")
    stop: int = Field(default=4, ge=0, le=64, description="Most stop sequences")
    prompt_tokens: int | None = Field(default=None, ge=1, description="Longest prompt, in the "
                                      "model's tokens")
    body_bytes: int | None = Field(default=None, ge=1024)
    messages: int | None = Field(default=None, ge=1)


PII_TYPES: tuple[str, ...] = (
    "EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "US_SSN", "FR_NIR",
    "AWS_ACCESS_KEY", "API_KEY", "PRIVATE_KEY", "JWT", "BEARER_TOKEN", "SECRET_TOKEN")


class DataProtection(_Strict):
    """Personal data and secrets in prompts (``input``) and answers (``output``)."""

    input: Literal["allow", "redact", "block"] = "allow"
    output: Literal["allow", "redact"] = "allow"
    types: tuple[str, ...] = PII_TYPES

    @model_validator(mode="after")
    def _known_types(self) -> DataProtection:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown type(s) {', '.join(unknown)}; known: "
                             f"{', '.join(PII_TYPES)}")
        return self


class AuditPolicy(_Strict):
    """What the audit record keeps of a request's text: ``none`` (metadata only),
    ``redacted`` (placeholders instead of personal data), ``encrypted`` (the full text,
    AES-256-GCM, readable only with the audit key)."""

    content: AuditContent = "none"


class InjectionGuard(_Strict):
    mode: GuardMode = "off"
    threshold: float = Field(default=0.5, gt=0, le=1, description="Heuristic score (0-1) from "
                             "which a prompt counts as an injection attempt")


class ToolSpec(_Strict):
    parameters: dict[str, object] | None = Field(
        default=None, description="The JSON schema the tool's parameters must equal; none: any")


class ToolGuard(_Strict):
    mode: GuardMode = "off"
    allowed: dict[str, ToolSpec] = Field(default_factory=dict)


class Guards(_Strict):
    injection: InjectionGuard = Field(default_factory=InjectionGuard)
    tools: ToolGuard = Field(default_factory=ToolGuard)


class Limits(_Strict):
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)


class Budgets(_Strict):
    tokens_per_day: int | None = Field(default=None, ge=1)
    tokens_per_month: int | None = Field(default=None, ge=1)

    @property
    def any(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None


class Policy(_Strict):
    description: str = ""
    models: tuple[str, ...] = ()
    scopes: tuple[Scope, ...] = Field(min_length=1)
    engine_control: tuple[str, ...] = Field(
        default=(), description="Engine-control request fields this client may send "
        "(chat_template, chat_template_kwargs, token_id_prompts, ...); every other is refused")
    caps: Caps = Field(default_factory=Caps)
    limits: Limits = Field(default_factory=Limits)
    budgets: Budgets = Field(default_factory=Budgets)
    pii: DataProtection = Field(default_factory=DataProtection)
    audit: AuditPolicy = Field(default_factory=AuditPolicy)
    guards: Guards = Field(default_factory=Guards)
    fallbacks: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Per model, the models that answer in its place, in "
        "order, when none of its replicas is available; each must be one this policy allows")

    @model_validator(mode="after")
    def _fallbacks_allowed(self) -> Policy:
        for model, fallbacks in self.fallbacks.items():
            for fallback in fallbacks:
                if fallback == model:
                    raise ValueError(f"fallbacks.{model}: a model cannot fall back to itself")
                if not self.allows_model(fallback):
                    raise ValueError(f"fallbacks.{model}: '{fallback}' is not in this policy's "
                                     "models; a fallback cannot widen what a client may use")
            if len(set(fallbacks)) != len(fallbacks):
                raise ValueError(f"fallbacks.{model}: models repeat")
        return self

    @model_validator(mode="after")
    def _admin_alone(self) -> Policy:
        if "admin" in self.scopes and len(self.scopes) > 1:
            raise ValueError("the admin scope cannot be combined with inference scopes: "
                             "give operators a client of their own")
        if "admin" in self.scopes and self.models:
            raise ValueError("an admin policy cannot list models")
        if len(set(self.scopes)) != len(self.scopes):
            raise ValueError("scopes repeat")
        return self

    def allows_model(self, model: str) -> bool:
        return ANY_MODEL in self.models or model in self.models


class PolicyFile(_Strict):
    version: int = Field(ge=1, description="Bump on every change; the gateway reports it.")
    policies: dict[str, Policy] = Field(min_length=1)
