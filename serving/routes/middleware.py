"""Pure ASGI middleware that observes every request and changes none: it gives the request its
id and its ``RequestContext``, and when the answer ends freezes the context into the request's
``Outcome``, from which the audit record (inference requests, written before the client sees
the last byte), the metrics and the access-log line are built.

Never buffers a body: it only watches ``http.response.start`` for the status.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import logs
from serving.audit.trail import AUDITED, AuditTrail, build_record
from serving.domain.endpoints import QUIET, endpoint_name
from serving.domain.outcome import Outcome, RequestContext
from serving.logs import request_id_var
from serving.metrics import GatewayMetrics
from serving.routes.context import CONTEXT_KEY

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, access_log: bool = True,
                 audit: AuditTrail | None = None,
                 observers: Sequence[Callable[[Outcome], None]] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.observers = tuple(observers)  # each request's outcome, once it ended
        self.audit = audit
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        path = scope["path"]
        endpoint = endpoint_name(path)
        audit = self.audit if endpoint in AUDITED and scope["method"] == "POST" else None
        ctx = RequestContext(request_id=request_id, started=time.perf_counter(),
                             endpoint=endpoint,
                             trace_id=_trace_id(scope) if audit is not None else None)
        scope[CONTEXT_KEY] = ctx
        token = request_id_var.set(request_id)
        status = 500
        header_value = request_id.encode()
        outcome: Outcome | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, outcome
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", header_value)]
            elif (audit is not None and message["type"] == "http.response.body"
                  and not message.get("more_body")):
                # The record is written before the client sees the end of the answer.
                outcome = ctx.finish(status)
                # On failure the trail logs it, keeps the record queued, refuses new requests.
                with contextlib.suppress(OSError):
                    await audit.record(build_record(outcome))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            # The request as it ended: after the last byte (and the audit write), with the
            # settlement and a late disconnect. The audit record, written before the last
            # byte, was built from the outcome as it stood then.
            final = ctx.finish(status)
            if audit is not None and outcome is None:  # the client left, or the request failed
                await audit.record(build_record(final), wait=False)
            self.metrics.observe(final)
            for observe in self.observers:
                observe(final)
            if self.access_log and final.endpoint not in QUIET:
                logs.access(logs.access_fields(final, scope["method"], path))
            request_id_var.reset(token)


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
