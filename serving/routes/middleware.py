"""Pure ASGI middleware: request id, per-request context, access log line and metrics.

Never buffers a body: it only watches ``http.response.start`` for the status.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import logs
from serving.errors import error_bytes
from serving.logs import request_id_var
from serving.metrics import GatewayMetrics
from serving.services.audit import AUDITED, AuditTrail, build_record
from serving.services.context import RequestContext

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
CONTEXT_KEY = "enclave.ctx"
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/oauth/token": "oauth_token",
    "/.well-known/jwks.json": "jwks",
}
_QUIET = frozenset({"healthz", "readyz", "metrics"})


_OPS = frozenset({"healthz", "readyz", "metrics"})
_NOT_FOUND = error_bytes("Not found.", "invalid_request_error", code="not_found")
_BUSY = error_bytes("The gateway is at its limit of requests in progress. Retry shortly.",
                    "service_unavailable", code="overloaded")


def context(scope: Scope) -> RequestContext:
    ctx: RequestContext = scope[CONTEXT_KEY]
    return ctx


def on_ops_listener(scope: Scope, ops_port: int | None) -> bool:
    """True when operations endpoints may show their detail here: no separate operations
    listener is configured, or the request arrived on it."""
    if ops_port is None:
        return True
    server = scope.get("server")
    return server is not None and server[1] == ops_port


def _reply(status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> ASGIApp:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra or [])]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


_NOT_FOUND_APP = _reply(404, _NOT_FOUND)
_BUSY_APP = _reply(503, _BUSY, [(b"retry-after", b"1")])


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, access_log: bool = True,
                 direct: dict[str, ASGIApp] | None = None,
                 audit: AuditTrail | None = None, max_in_flight: int | None = None,
                 ops_port: int | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit
        self.access_log = access_log
        # POST paths answered by their own ASGI app, past FastAPI's routing (the hot path).
        self.direct = direct or {}
        self.max_in_flight = max_in_flight
        self.ops_port = ops_port
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        path = scope["path"]
        endpoint = ENDPOINTS.get(path) or ("admin" if path.startswith("/admin/") else "other")
        ctx = RequestContext(request_id=request_id, started=time.perf_counter(),
                             endpoint=endpoint)
        scope[CONTEXT_KEY] = ctx
        token = request_id_var.set(request_id)
        status = 500
        header_value = request_id.encode()
        audit = self.audit if endpoint in AUDITED and scope["method"] == "POST" else None
        audited = False
        if audit is not None:
            ctx.trace_id = _trace_id(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status, audited
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", header_value)]
            elif (audit is not None and message["type"] == "http.response.body"
                  and not message.get("more_body")):
                # The record is written before the client sees the end of the answer.
                audited = True
                # On failure the trail logs it, keeps the record queued, refuses new requests.
                with contextlib.suppress(OSError):
                    await audit.record(build_record(ctx, status))
            await send(message)

        target = self.direct.get(path) if scope["method"] == "POST" else None
        if self.ops_port is not None:
            # The operations listener serves operations only; the API port, no metrics.
            on_ops = on_ops_listener(scope, self.ops_port)
            if (on_ops and endpoint not in _OPS) or (not on_ops and endpoint == "metrics"):
                ctx.error_code = "not_found"
                target = _NOT_FOUND_APP
        if (target is not _NOT_FOUND_APP and self.max_in_flight is not None
                and self.in_flight >= self.max_in_flight and endpoint not in _QUIET):
            ctx.error_code = "overloaded"
            target = _BUSY_APP
        self.metrics.in_flight.inc()
        self.in_flight += 1
        try:
            await (target or self.app)(scope, receive, send_wrapper)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if audit is not None and not audited:  # the client left, or the request failed
                await audit.record(build_record(ctx, status), wait=False)
            self._record(scope, ctx, status)
            request_id_var.reset(token)

    def _record(self, scope: Scope, ctx: RequestContext, status: int) -> None:
        elapsed = time.perf_counter() - ctx.started
        model = ctx.model or ("unknown" if ctx.endpoint in ("chat", "completions", "embeddings")
                              else "")
        m = self.metrics
        if ctx.endpoint not in _QUIET:
            m.requests.labels(ctx.endpoint, model, str(status)).inc()
            m.latency.labels(ctx.endpoint, model).observe(elapsed)
        if ctx.model is not None:
            if ctx.prompt_tokens:
                m.prompt_tokens.labels(ctx.model).inc(ctx.prompt_tokens)
            if ctx.completion_tokens:
                m.completion_tokens.labels(ctx.model).inc(ctx.completion_tokens)
            if ctx.ttft_s is not None:
                m.ttft.labels(ctx.model).observe(ctx.ttft_s)
            if ctx.client_disconnected:
                m.client_disconnects.labels(ctx.endpoint, ctx.model).inc()
        if self.access_log and ctx.endpoint not in _QUIET:
            extra: dict[str, Any] = {
                "method": scope["method"],
                "path": scope["path"] if ctx.endpoint != "other" else "(unrouted)",
                "endpoint": ctx.endpoint,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            }
            for name in ("key_id", "client_id", "model", "engine", "prompt_tokens",
                         "completion_tokens", "reserved_tokens", "charged_tokens",
                         "error_code"):
                value = getattr(ctx, name)
                if value is not None:
                    extra[name] = value
            if ctx.stream:
                extra["stream"] = True
            if ctx.ttft_s is not None:
                extra["ttft_ms"] = round(ctx.ttft_s * 1000, 2)
            if ctx.client_disconnected:
                extra["client_disconnected"] = True
            logs.access(extra)


def _trace_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"traceparent":
            match = _TRACEPARENT.match(value.decode("latin-1").strip())
            return match.group(1) if match else None
    return None


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            try:
                candidate: str = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _VALID_ID.match(candidate):
                return candidate
            break
    return os.urandom(16).hex()
