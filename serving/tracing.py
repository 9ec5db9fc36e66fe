"""Distributed tracing: W3C ``traceparent`` in, spans out over OTLP, ``traceparent`` on to vLLM.

A ``Tracing`` is built once (in lifespan) from plain arguments and closed there. Per request the
request path calls ``start_request`` with the client's ``traceparent`` header, opens children
for admission and for each upstream attempt, sends ``attempt.traceparent()`` to the engine and
ends every span it started::

    request (SERVER)            trace id and parent from the client's traceparent, if valid
    ├── admission (INTERNAL)
    ├── upstream attempt (CLIENT)   enclave.replica, enclave.attempt, enclave.outcome,
    └── upstream attempt (CLIENT)   enclave.retry_reason, http.response.status_code
                                    its traceparent is the one sent to vLLM

The header sent upstream names the attempt span (not the request span): each attempt is its
own outgoing call, so the engine's spans, if it traces, hang under the attempt that reached it.

Without an endpoint nothing is recorded and almost nothing is spent: the header is checked and
a valid one is forwarded unchanged (one small object per request, none without a header).
With one, spans go to an SDK ``TracerProvider`` of our own (never the global provider, which
FastAPI's own telemetry reads) through a ``BatchSpanProcessor`` and the OTLP HTTP/protobuf
exporter. Sampling follows the caller's sampled flag when there is a parent, else
``sample_ratio``; an unsampled request still forwards a traceparent (flag ``00``).

A header is accepted only in the strict W3C form: version ``00``, a 32-digit lowercase hex
trace id and a 16-digit span id, neither all zeros, and two hex flag digits. Anything else is
ignored and the request starts a new trace (or, untraced, forwards none).

Span attributes must never carry prompt or completion text, keys, tokens or other secrets: only
identifiers (request id, client name), model and replica names, attempt numbers, outcomes,
reasons and status codes. Exception messages are never recorded (they can quote the prompt):
``error`` takes a short code.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]

# Span names and attribute keys the request path uses.
ADMISSION = "admission"
UPSTREAM_ATTEMPT = "upstream attempt"
REQUEST_ID = "enclave.request_id"
CLIENT = "enclave.client"
MODEL = "enclave.model"
REPLICA = "enclave.replica"
ATTEMPT = "enclave.attempt"
OUTCOME = "enclave.outcome"
RETRY_REASON = "enclave.retry_reason"
HTTP_STATUS = "http.response.status_code"
ERROR_TYPE = "error.type"

TRACES_PATH = "/v1/traces"

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_PROPAGATOR = TraceContextTextMapPropagator()

log = logging.getLogger("enclave.tracing")


def valid_traceparent(value: str | None) -> str | None:
    """The header if it is a valid W3C version-00 ``traceparent``, else None."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match.group(1) == _ZERO_TRACE or match.group(2) == _ZERO_SPAN:
        return None
    return value


class Span(Protocol):
    """One span of a request, or its untraced stand-in: end every span started."""

    def child(self, name: str, attributes: Attributes | None = None, *,
              client: bool = False) -> Span:
        """A span under this one; ``client=True`` for an outgoing call (an upstream attempt)."""
        ...

    def set(self, key: str, value: AttributeValue) -> None: ...

    def error(self, code: str) -> None:
        """Marks the span failed with a short code (``upstream_timeout``), never a message."""
        ...

    def end(self) -> None:
        """Ends the span; a second call does nothing."""
        ...

    def traceparent(self) -> str | None:
        """The ``traceparent`` to send upstream: this span as the parent, in the same trace."""
        ...

    def trace_id(self) -> str | None:
        """The trace id (32 hex digits) this span is in, if any."""
        ...

    def __enter__(self) -> Span: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _Forwarded:
    """Untraced: records nothing, forwards the client's valid traceparent (or none)."""

    __slots__ = ("_traceparent",)

    def __init__(self, traceparent: str | None) -> None:
        self._traceparent = traceparent

    def child(self, name: str, attributes: Attributes | None = None, *,
              client: bool = False) -> Span:
        return self

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def error(self, code: str) -> None:
        pass

    def end(self) -> None:
        pass

    def traceparent(self) -> str | None:
        return self._traceparent

    def trace_id(self) -> str | None:
        return None if self._traceparent is None else self._traceparent[3:35]

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass


UNTRACED: Span = _Forwarded(None)  # a span that records nothing and forwards no header


class _Recorded:
    """A span of our own provider (recording, or not when sampled out)."""

    __slots__ = ("_ended", "_span", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self._span = span
        self._ended = False

    def child(self, name: str, attributes: Attributes | None = None, *,
              client: bool = False) -> Span:
        span = self._tracer.start_span(
            name, context=trace.set_span_in_context(self._span, Context()),
            kind=SpanKind.CLIENT if client else SpanKind.INTERNAL, attributes=attributes)
        return _Recorded(self._tracer, span)

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def error(self, code: str) -> None:
        self._span.set_attribute(ERROR_TYPE, code)
        self._span.set_status(Status(StatusCode.ERROR, code))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._span.end()

    def traceparent(self) -> str | None:
        ctx = self._span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"

    def trace_id(self) -> str | None:
        return f"{self._span.get_span_context().trace_id:032x}"

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.error(exc_type.__name__)
        self.end()


class Tracing:
    """Starts request spans; exports them over OTLP/HTTP when ``endpoint`` is set.

    ``endpoint`` is the collector's base URL (``http://collector:4318``; ``/v1/traces`` is
    added unless already there). ``headers`` go to the collector (its credentials), never into
    a span. ``resource`` names this process (``service.instance.id``, the worker number).
    Spans are sent in batches every ``schedule_delay_s``; one export gives up after
    ``export_timeout_s`` (the exporter retries within it). The SDK also reads its standard
    ``OTEL_*`` variables when built (TLS files, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``);
    these arguments win over them. Build it in each worker process (lifespan), after any fork.
    """

    def __init__(self, endpoint: str | None, *, service_name: str = "enclave-gateway",
                 headers: Mapping[str, str] | None = None, sample_ratio: float = 1.0,
                 resource: Attributes | None = None, export_timeout_s: float = 5.0,
                 schedule_delay_s: float = 1.0) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if endpoint is None:
            return
        url = endpoint.rstrip("/")
        if not url.endswith(TRACES_PATH):
            url += TRACES_PATH
        exporter = OTLPSpanExporter(endpoint=url, headers=dict(headers or {}),
                                    timeout=export_timeout_s, compression=Compression.Gzip)
        # Shut down by lifespan, not at exit: an atexit hook would keep every provider alive.
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create({**(resource or {}), SERVICE_NAME: service_name}),
            shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=schedule_delay_s * 1000))
        self._tracer = self._provider.get_tracer("serving.tracing")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(self, traceparent: str | None, name: str,
                      attributes: Attributes | None = None) -> Span:
        """The request's span (SERVER), under the client's span if its header is valid."""
        valid = valid_traceparent(traceparent)
        if self._tracer is None:
            return UNTRACED if valid is None else _Forwarded(valid)
        parent = Context() if valid is None else _PROPAGATOR.extract(
            {"traceparent": valid}, context=Context())
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes)
        return _Recorded(self._tracer, span)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Sends the spans still queued, then stops; waits ``timeout_s`` at most.

        Later requests are untraced. Blocks: from the event loop, ``await aclose()``.
        """
        if self._provider is None:
            return
        provider, self._provider, self._tracer = self._provider, None, None

        def close() -> None:
            provider.force_flush(int(timeout_s * 1000))
            provider.shutdown()

        # The SDK's flush does not keep to its timeout (each batch may take export_timeout_s):
        # a daemon thread that we stop waiting for does.
        closer = threading.Thread(target=close, name="enclave-tracing-shutdown", daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            log.warning("tracing: spans not sent within %.1f s of shutdown, dropped", timeout_s)

    async def aclose(self, timeout_s: float = 3.0) -> None:
        """``shutdown`` in a worker thread, so the event loop goes on while spans are sent."""
        await asyncio.to_thread(self.shutdown, timeout_s)
