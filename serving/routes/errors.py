"""Every error leaves the gateway OpenAI-shaped: ``{"error": {message, type, param, code}}``.

One function, ``reply_for``, maps any exception to its response, and records the error's code
in the request's context for the access log and the audit record. The inference entry, the
relay and FastAPI's exception handlers (the other routes) all answer through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope, Send

from serving.errors import GatewayError, InvalidBody, InvalidRequest, MethodNotAllowed, NotFound
from serving.routes.context import find_context

log = logging.getLogger("enclave.errors")
_JSON = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    log_code: str  # what the access log and the audit record say


def as_gateway_error(exc: BaseException) -> GatewayError:
    """The gateway's own error for ``exc``; anything unexpected is logged and becomes 500."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            return NotFound("Not found.", headers=headers)
        if exc.status_code == 405:
            return MethodNotAllowed("Method not allowed.", headers=headers)
        err = InvalidRequest(str(exc.detail), code="http_error", headers=headers)
        err.status = exc.status_code
        return err
    if isinstance(exc, RequestValidationError):
        # Name the field and the rule, never echo the value given.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(where) or None
        return InvalidBody(f"Invalid request: {param or 'body'}: "
                           f"{first.get('msg', 'invalid')}.", param=param)
    log.error("unhandled error", exc_info=exc)
    return GatewayError("Internal error.")


def reply_for(exc: BaseException, scope: Scope | None = None) -> ErrorReply:
    err = as_gateway_error(exc)
    body = orjson.dumps(err.body())
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in err.headers.items()]
    if scope is not None and (ctx := find_context(scope)) is not None:
        ctx.error_code = err.log_code
    return ErrorReply(err.status, headers, body, err.log_code)


async def send_error(scope: Scope, send: Send, exc: BaseException) -> None:
    """Answer ``exc`` on a raw ASGI ``send`` (nothing may have been sent yet)."""
    reply = reply_for(exc, scope)
    await send({"type": "http.response.start", "status": reply.status,
                "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body})


def install(app: FastAPI) -> None:
    """FastAPI's exception handlers, for the routes FastAPI serves, answer through
    ``reply_for`` too."""

    async def handle(request: Request, exc: Exception) -> Response:
        reply = reply_for(exc, request.scope)
        response = Response(reply.body, status_code=reply.status)
        response.raw_headers = reply.headers
        return response

    for kind in (GatewayError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, handle)
