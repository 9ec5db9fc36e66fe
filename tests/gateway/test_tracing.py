"""Tracing against a real OTLP/HTTP receiver on loopback: the caller's trace is continued, the
spans nest as the request path opens them, the header sent upstream names the attempt, and a
malformed header, an untraced gateway or an unsampled caller cost no exported span."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk import trace as sdk_trace

from serving import tracing as tr
from serving.tracing import Tracing, valid_traceparent
from tests.support.otlp import OtlpReceiver, ReceivedSpan

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE}-{PARENT}-01"

MALFORMED = [
    pytest.param(f"00-{TRACE[:-1]}-{PARENT}-01", id="short-trace-id"),
    pytest.param(f"00-{TRACE}-{PARENT}0-01", id="long-span-id"),
    pytest.param(f"{INCOMING}-00", id="extra-field"),
    pytest.param(f"00-{TRACE}-{PARENT.upper()}-01", id="uppercase-span-id"),
    pytest.param(f"00-{TRACE.upper()}-{PARENT}-01", id="uppercase-trace-id"),
    pytest.param(f"00-{'0' * 32}-{PARENT}-01", id="zero-trace-id"),
    pytest.param(f"00-{TRACE}-{'0' * 16}-01", id="zero-span-id"),
    pytest.param(f"ff-{TRACE}-{PARENT}-01", id="version-ff"),
    pytest.param(f"01-{TRACE}-{PARENT}-01", id="version-01"),
    pytest.param(f"00-{TRACE}-{PARENT}-1", id="short-flags"),
    pytest.param(f"00-{TRACE[:-1]}g-{PARENT}-01", id="not-hex"),
    pytest.param(f" {INCOMING}", id="padded"),
    pytest.param(f"{INCOMING}\n", id="newline"),
    pytest.param("", id="empty"),
]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans}


def serve_one_request(tracing: Tracing, traceparent: str | None) -> list[str | None]:
    """What the request path does: the request, admission, two attempts (a retry).
    Returns the traceparent sent upstream by each attempt."""
    request = tracing.start_request(traceparent, "POST /v1/chat/completions",
                                    {tr.REQUEST_ID: "req-1", tr.MODEL: "demo-chat"})
    with request.child(tr.ADMISSION, {tr.CLIENT: "demo"}):
        pass
    sent = []
    for number, replica in enumerate(["demo-chat-v1-a", "demo-chat-v1-b"], start=1):
        attempt = request.child(tr.UPSTREAM_ATTEMPT, {tr.REPLICA: replica, tr.ATTEMPT: number},
                                client=True)
        sent.append(attempt.traceparent())
        if number == 1:
            attempt.set(tr.OUTCOME, "retry")
            attempt.set(tr.RETRY_REASON, "connect_error")
            attempt.error("upstream_connect")
        else:
            attempt.set(tr.OUTCOME, "ok")
            attempt.set(tr.HTTP_STATUS, 200)
        attempt.end()
    request.set(tr.HTTP_STATUS, 200)
    request.end()
    return sent


def test_valid_traceparent_accepts_the_w3c_form() -> None:
    assert valid_traceparent(INCOMING) == INCOMING
    assert valid_traceparent(f"00-{TRACE}-{PARENT}-00") is not None  # unsampled is valid
    assert valid_traceparent(None) is None


@pytest.mark.parametrize("header", MALFORMED)
def test_a_malformed_traceparent_is_ignored(header: str) -> None:
    assert valid_traceparent(header) is None


def test_the_request_continues_the_callers_trace_and_attempts_nest_under_it(
        receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint, resource={"enclave.worker": 3},
                      schedule_delay_s=60)  # nothing leaves before shutdown flushes
    sent = serve_one_request(tracing, INCOMING)
    assert receiver.spans == []
    tracing.shutdown()

    spans = receiver.spans  # shutdown returned: already there
    assert len(spans) == 4
    assert {s.trace_id for s in spans} == {TRACE}
    request = by_name(spans)["POST /v1/chat/completions"]
    assert request.parent_span_id == PARENT and request.kind == "server"
    assert request.attributes == {tr.REQUEST_ID: "req-1", tr.MODEL: "demo-chat",
                                  tr.HTTP_STATUS: 200}
    admission = by_name(spans)[tr.ADMISSION]
    assert admission.parent_span_id == request.span_id and admission.kind == "internal"
    first, second = (s for s in spans if s.name == tr.UPSTREAM_ATTEMPT)
    assert first.parent_span_id == second.parent_span_id == request.span_id
    assert first.kind == second.kind == "client"
    assert first.attributes == {tr.REPLICA: "demo-chat-v1-a", tr.ATTEMPT: 1, tr.OUTCOME: "retry",
                                tr.RETRY_REASON: "connect_error",
                                tr.ERROR_TYPE: "upstream_connect"}
    assert (first.status, first.status_message) == ("error", "upstream_connect")
    assert second.attributes == {tr.REPLICA: "demo-chat-v1-b", tr.ATTEMPT: 2, tr.OUTCOME: "ok",
                                 tr.HTTP_STATUS: 200}
    assert second.status == request.status == "unset"
    # Each attempt sends itself as the engine's parent, in the caller's trace.
    assert sent == [f"00-{TRACE}-{first.span_id}-01", f"00-{TRACE}-{second.span_id}-01"]
    assert request.resource["service.name"] == "enclave-gateway"
    assert request.resource["enclave.worker"] == 3


def test_without_a_traceparent_the_request_starts_a_trace(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint)
    sent = serve_one_request(tracing, None)
    tracing.shutdown()
    request = by_name(receiver.spans)["POST /v1/chat/completions"]
    assert request.parent_span_id == "" and request.trace_id != TRACE
    assert all(h is not None and h[3:35] == request.trace_id for h in sent)


def test_malformed_traceparents_start_new_traces(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint)
    headers = [p.values[0] for p in MALFORMED]
    for header in headers:
        span = tracing.start_request(header, "request")  # type: ignore[arg-type]
        assert span.trace_id() != TRACE
        span.end()
    tracing.shutdown()
    spans = receiver.spans
    assert len(spans) == len(headers)
    assert all(s.parent_span_id == "" and s.trace_id != TRACE for s in spans)
    assert len({s.trace_id for s in spans}) == len(headers)


def test_untraced_the_valid_header_is_forwarded_unchanged_and_no_span_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sdk_span(*args: object, **kwargs: object) -> None:
        raise AssertionError("an SDK span was started")

    monkeypatch.setattr(sdk_trace.Tracer, "start_span", no_sdk_span)
    tracing = Tracing(None)
    assert not tracing.enabled
    sent = serve_one_request(tracing, INCOMING)
    assert sent == [INCOMING, INCOMING]
    assert tracing.start_request(INCOMING, "request").trace_id() == TRACE
    # No header, or a malformed one: nothing forwarded, and one shared stand-in.
    assert serve_one_request(tracing, None) == [None, None]
    assert serve_one_request(tracing, f"ff-{TRACE}-{PARENT}-01") == [None, None]
    assert tracing.start_request(None, "a") is tracing.start_request("junk", "b")
    tracing.shutdown()


def test_an_unsampled_caller_is_followed_and_still_propagated(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint)
    sent = serve_one_request(tracing, f"00-{TRACE}-{PARENT}-00")
    tracing.shutdown()
    assert receiver.spans == []
    for header in sent:
        assert header is not None and header.startswith(f"00-{TRACE}-")
        assert header.endswith("-00") and PARENT not in header


def test_a_zero_sample_ratio_exports_nothing_for_new_traces(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint, sample_ratio=0.0)
    [header, _] = serve_one_request(tracing, None)
    tracing.shutdown()
    assert receiver.spans == []
    assert header is not None and valid_traceparent(header) == header
    assert int(header[-2:], 16) & 1 == 0  # not sampled (the SDK may set the random-id flag)


def test_an_exception_marks_the_span_by_type_never_by_message(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint)
    request = tracing.start_request(INCOMING, "request")
    with pytest.raises(ValueError), request.child(tr.ADMISSION):
        raise ValueError("my card is 4111 1111 1111 1111")
    request.end()
    request.end()  # a second end does nothing
    tracing.shutdown()
    admission = by_name(receiver.spans)[tr.ADMISSION]
    assert (admission.status, admission.status_message) == ("error", "ValueError")
    assert admission.attributes == {tr.ERROR_TYPE: "ValueError"}
    assert "4111" not in repr(receiver.spans)
    assert len(receiver.spans) == 2


def test_the_collector_gets_its_headers_gzip_and_the_full_path(receiver: OtlpReceiver) -> None:
    tracing = Tracing(f"{receiver.endpoint}/v1/traces",
                      headers={"Authorization": "Bearer collector-token"},
                      service_name="enclave-test")
    tracing.start_request(None, "request").end()
    tracing.shutdown()
    [span] = receiver.spans
    assert span.resource["service.name"] == "enclave-test"
    [headers] = receiver.headers
    assert headers["authorization"] == "Bearer collector-token"
    assert headers["content-encoding"] == "gzip"


def test_spans_are_sent_in_the_background_without_shutdown(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint, schedule_delay_s=0.05)
    tracing.start_request(INCOMING, "request").end()
    [span] = receiver.wait_for(1)
    assert span.trace_id == TRACE
    tracing.shutdown()


def test_after_shutdown_requests_are_untraced(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint)
    tracing.shutdown()
    tracing.shutdown()  # twice is fine
    assert not tracing.enabled
    span = tracing.start_request(INCOMING, "late")
    assert span.child(tr.UPSTREAM_ATTEMPT, client=True).traceparent() == INCOMING
    span.end()
    assert receiver.spans == []



@pytest.mark.anyio
async def test_aclose_flushes_without_holding_the_loop(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint, schedule_delay_s=60)
    tracing.start_request(None, "request").end()
    await tracing.aclose()
    assert len(receiver.spans) == 1


def test_shutdown_keeps_to_its_timeout_when_the_collector_hangs(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        tracing = Tracing(f"http://127.0.0.1:{port}", export_timeout_s=1,
                          schedule_delay_s=60)
        tracing.start_request(None, "request").end()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="enclave.tracing"):
            tracing.shutdown(timeout_s=0.2)
        assert time.monotonic() - started < 0.9
        assert "dropped" in caplog.text
        # Let the abandoned export time out here, not during a later test.
        for thread in threading.enumerate():
            if thread.name == "enclave-tracing-shutdown":
                thread.join(5)
