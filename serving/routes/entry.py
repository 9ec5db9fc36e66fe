"""The gateway's entry, a small pure-ASGI router behind the request middleware.

For each HTTP request, in order: on a separate operations listener only the operations
endpoints are served (and ``/metrics`` never on the API port); past the ceiling on requests in
progress, 503 ``overloaded`` (the probes excepted); a ``POST`` to an inference path goes to its
handler (``routes.inference.ROUTES``; any other method there is 405) without FastAPI's routing
and exception layers, which cost about a sixth of a proxied request's CPU (measured with py-spy
under load); everything else goes on to FastAPI.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.domain.endpoints import QUIET, endpoint_name
from serving.errors import GatewayBusy, MethodNotAllowed, NotFound
from serving.routes.context import find_context
from serving.routes.errors import send_error

_BUSY = "The gateway is at its limit of requests in progress. Retry shortly."


def on_ops_listener(scope: Scope, ops_port: int | None) -> bool:
    """True when operations endpoints may show their detail here: no separate operations
    listener is configured, or the request arrived on it."""
    if ops_port is None:
        return True
    server = scope.get("server")
    return server is not None and server[1] == ops_port


class Entry:
    def __init__(self, app: ASGIApp, routes: dict[str, ASGIApp],
                 max_in_flight: int | None = None, ops_port: int | None = None) -> None:
        self.app = app
        self.routes = routes  # inference path -> its handler, for POST
        self.max_in_flight = max_in_flight
        self.ops_port = ops_port
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        ctx = find_context(scope)  # the middleware named the endpoint already
        endpoint = ctx.endpoint if ctx is not None else endpoint_name(path)
        if self.ops_port is not None:
            # The operations listener serves operations only; the API port, no metrics.
            on_ops = on_ops_listener(scope, self.ops_port)
            if (on_ops and endpoint not in QUIET) or (not on_ops and endpoint == "metrics"):
                await send_error(scope, send, NotFound("Not found."))
                return
        if (self.max_in_flight is not None and self.in_flight >= self.max_in_flight
                and endpoint not in QUIET):
            await send_error(scope, send, GatewayBusy(_BUSY, 1))
            return
        target = self.routes.get(path)
        if target is not None and scope["method"] != "POST":
            await send_error(scope, send, MethodNotAllowed("Method not allowed.",
                                                           headers={"Allow": "POST"}))
            return
        self.in_flight += 1
        try:
            await (target or self.app)(scope, receive, send)
        finally:
            self.in_flight -= 1
