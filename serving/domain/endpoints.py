"""The endpoints the gateway serves, named once. Every layer that speaks of an endpoint (the
request middleware's labels, the inference router, the request contract, a policy's scopes, a
manifest's task, the audit trail) reads this table instead of spelling the paths again."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the label in metrics, the access log and audit records
    path: str
    inference: bool = False  # a POST the gateway forwards to an engine (costed, audited)
    quiet: bool = False  # operations probes: no access-log line, no request metrics


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("chat", "/v1/chat/completions", inference=True),
    Endpoint("completions", "/v1/completions", inference=True),
    Endpoint("embeddings", "/v1/embeddings", inference=True),
    Endpoint("models", "/v1/models"),
    Endpoint("healthz", "/healthz", quiet=True),
    Endpoint("readyz", "/readyz", quiet=True),
    Endpoint("metrics", "/metrics", quiet=True),
    Endpoint("oauth_token", "/oauth/token"),
    Endpoint("jwks", "/.well-known/jwks.json"),
)
BY_PATH: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}
# The inference endpoints by name, with the engine path each is forwarded to (the same path).
INFERENCE_PATHS: dict[str, str] = {e.name: e.path for e in ENDPOINTS if e.inference}
INFERENCE: frozenset[str] = frozenset(INFERENCE_PATHS)
QUIET: frozenset[str] = frozenset(e.name for e in ENDPOINTS if e.quiet)
ADMIN = "admin"  # every path under /admin/
OTHER = "other"  # any other path (answered 404)


def endpoint_name(path: str) -> str:
    """The label for a request path: a known endpoint's name, ``admin`` or ``other``."""
    known = BY_PATH.get(path)
    if known is not None:
        return known.name
    return ADMIN if path.startswith("/admin/") else OTHER
