"""Where a request's ``RequestContext`` lives while it is served: in the ASGI scope, put there
by the request middleware (``routes.middleware``) and read by the web layer."""

from __future__ import annotations

from starlette.types import Scope

from serving.domain.outcome import RequestContext

CONTEXT_KEY = "enclave.ctx"


def context(scope: Scope) -> RequestContext:
    ctx: RequestContext = scope[CONTEXT_KEY]
    return ctx


def find_context(scope: Scope) -> RequestContext | None:
    ctx: RequestContext | None = scope.get(CONTEXT_KEY)
    return ctx
