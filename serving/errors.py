"""The gateway's exception tree, each mapped once to an OpenAI-shaped error response.

    GatewayError                      (500 internal_error)
    ├── InvalidRequest                (400 invalid_request_error)
    │   ├── InvalidBody               (400, logged invalid_request: FastAPI's validation)
    │   ├── UnsupportedParameter      (400 unsupported_parameter)
    │   ├── RequestTimeout            (408 request_timeout)
    │   ├── PayloadTooLarge           (413)
    │   │   └── InspectionTooLong     (413 inspection_too_long)
    │   └── IdempotencyConflict       (422 idempotency_key_reused)
    │       └── IdempotencyAnswerNotKept (422 idempotency_answer_not_kept)
    ├── AuthenticationFailed          (401 invalid_api_key)
    ├── PermissionDenied              (403 permission_denied)
    ├── NotFound                      (404)
    │   └── ModelNotFound             (404 model_not_found)
    ├── MethodNotAllowed              (405 method_not_allowed)
    ├── RetryLater                    (+ Retry-After)
    │   ├── RateLimited               (429 rate_limit_exceeded)
    │   │   └── QuotaExceeded         (429 insufficient_quota)
    │   ├── EngineUnavailable         (503 engine_unavailable)
    │   ├── StoreUnavailable          (503 state_store_unavailable)
    │   ├── GatewayBusy               (503 overloaded)
    │   ├── IdempotencyInProgress     (409 idempotency_in_progress)
    │   └── AuditUnavailable          (503 audit_unavailable)
    ├── EngineTimeout                 (504)
    └── EngineBadResponse             (502)

Messages never contain a presented key, a prompt or any other request content.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    @property
    def log_code(self) -> str:
        """What the access log records for this error."""
        return self.code if self.code is not None else self.type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class InvalidBody(InvalidRequest):
    """A body FastAPI's validation refused (the admin and OAuth routes)."""

    @property
    def log_code(self) -> str:
        return "invalid_request"


class UnsupportedParameter(InvalidRequest):
    """A field the gateway's request contract does not declare, or one the client's policy
    does not allow: refused, never dropped or forwarded."""

    code = "unsupported_parameter"


class RequestTimeout(InvalidRequest):
    """The request (headers or body) was not received within its deadline."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class InspectionTooLong(PayloadTooLarge):
    """The request's text took longer than the per-request ceiling to inspect."""

    code = "inspection_too_long"


class IdempotencyConflict(InvalidRequest):
    """The ``Idempotency-Key`` was used before, by this client, with another body. The message
    names neither the key nor the body."""

    status = 422
    code = "idempotency_key_reused"

    def __init__(self, message: str = "This Idempotency-Key was already used with a different "
                 "request body; use a new key for a new request.") -> None:
        super().__init__(message, param="Idempotency-Key")


class IdempotencyAnswerNotKept(IdempotencyConflict):
    """The request under this key already ran, but its answer was not kept (too large to store,
    or unreadable): it is not run (nor charged) again; a new key runs it again."""

    code = "idempotency_answer_not_kept"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Invalid or missing API key. Pass it as "
                 "'Authorization: Bearer <key>'.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class RetryLater(GatewayError):
    """An error the client should retry after ``retry_after_s`` (sent as ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimited(RetryLater):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class Conflict(InvalidRequest):
    """The request is valid but the state it would change is busy (a rollout under way)."""

    status = 409
    code = "conflict"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class EngineUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"


class StoreUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"
    code = "state_store_unavailable"


class GatewayBusy(RetryLater):
    """The gateway's ceiling on requests in progress is reached."""

    status = 503
    type = "service_unavailable"
    code = "overloaded"


class IdempotencyInProgress(RetryLater):
    """A request with the same ``Idempotency-Key`` and body is still running (here or on another
    gateway) and did not finish within the wait: retry after ``Retry-After``."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_in_progress"


class AuditUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"
    code = "audit_unavailable"


class EngineTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "engine_timeout"


class EngineBadResponse(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(message: str, type_: str, param: str | None = None,
                code: str | int | None = None) -> bytes:
    return orjson.dumps(error_body(message, type_, param, code))
