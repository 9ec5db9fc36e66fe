"""Every error leaves the gateway OpenAI-shaped: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import GatewayError, error_body
from serving.responses import JSONResponse
from serving.routes.middleware import context

log = logging.getLogger("enclave.errors")
_HTTP_TYPES = {404: ("not_found", "invalid_request_error"),
               405: ("method_not_allowed", "invalid_request_error")}


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        context(request.scope).error_code = exc.log_code
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, type_ = _HTTP_TYPES.get(exc.status_code, ("http_error", "invalid_request_error"))
        message = ("Not found." if exc.status_code == 404
                   else "Method not allowed." if exc.status_code == 405 else str(exc.detail))
        context(request.scope).error_code = code
        return JSONResponse(error_body(message, type_, None, code),
                              status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the rule, never echo the value given.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(where) or None
        message = f"Invalid request: {param or 'body'}: {first.get('msg', 'invalid')}."
        context(request.scope).error_code = "invalid_request"
        return JSONResponse(error_body(message, "invalid_request_error", param),
                              status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body("Internal error.", "internal_error", None,
                                         "internal_error"), status_code=500)
