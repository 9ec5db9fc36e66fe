"""The ASGI response that talks to the engine and relays its answer.

All upstream I/O happens inside ``__call__`` so the client's disconnect can be watched the whole
time: when the client goes away (before or during the answer), the upstream response is closed,
which closes the connection to vLLM, which aborts the request and frees its KV cache.
Streams are forwarded event by event as they arrive, never buffered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from functools import partial

import aiohttp
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from serving.admission.gate import Admission, Gatekeeper
from serving.admission.idempotency import Claim
from serving.contract import PATHS
from serving.domain.outcome import RequestContext
from serving.errors import EngineBadResponse, EngineTimeout, GatewayError, error_bytes
from serving.pipeline.intake import ParsedRequest
from serving.protection.output import OutputFilter, ToolCallRefused
from serving.routes.errors import send_error
from serving.tracing import UNTRACED, Span
from serving.upstream.client import TIMEOUTS, TRANSPORT_ERRORS, Upstream
from serving.upstream.engine_errors import client_error
from serving.upstream.pool import ModelRoute
from serving.upstream.replicas import Replica
from serving.upstream.sse import StreamAccountant, usage_from_body

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_MAX_UPSTREAM_ERROR_BODY = 64 * 1024


class RelayResponse(Response):
    """A Starlette response (so FastAPI passes it through) that does its own sending."""

    def __init__(self, upstream: Upstream, parsed: ParsedRequest, ctx: RequestContext,
                 gate: Gatekeeper, admission: Admission, output: OutputFilter | None,
                 fallbacks: Sequence[ModelRoute] = (), span: Span = UNTRACED,
                 claim: Claim | None = None) -> None:
        super().__init__()
        self.upstream = upstream
        self.parsed = parsed
        self.ctx = ctx
        self.gate = gate
        self.admission = admission
        self.output = output  # the answer's filter, when the policy filters or keeps it
        self.fallbacks = fallbacks  # the client's fallback models, tried when none is left
        self.span = span  # the request's; each attempt gets a child
        self.claim = claim  # an Idempotency-Key's: its answer is kept for duplicates
        self._settled = False
        self._outcome = "client_gone"  # the attempt's, for the replica's record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One watcher task per request (cheaper than a task group on the hot path): when the
        # client goes away before the answer is complete, it cancels this task, whose
        # clean-up closes the upstream connection.
        complete = False
        this_task = asyncio.current_task()
        assert this_task is not None

        async def tracked_send(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                # Servers also report a disconnect once the response is complete.
                if message["type"] == "http.disconnect":
                    if not complete:
                        self.ctx.client_disconnected = True
                        this_task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await self._exchange(tracked_send)
        except GatewayError as exc:
            self.gate.reckon(self.admission, self.ctx)  # what the engine's work still costs
            await send_error(scope, tracked_send, exc)
        except asyncio.CancelledError:
            if not self.ctx.client_disconnected:
                raise
            this_task.uncancel()  # ours: the client left; nothing more to send
        finally:
            watcher.cancel()
            if self.claim is not None and not self.claim.finished:
                await self.claim.release()  # no answer kept: a duplicate runs again
            # However the exchange ended: settle the budget, give back the concurrent slot.
            await self.gate.finish(self.admission, self.ctx)

    async def _exchange(self, send: Send) -> None:
        p, ctx = self.parsed, self.ctx
        ctx.forwarding = True
        fallbacks = [(route, partial(p.body_for, route.name)) for route in self.fallbacks]
        attempt = await self.upstream.open(
            p.route, PATHS[p.endpoint], p.body, ctx, stream=p.stream, pinned=p.pinned,
            prefix=p.affinity, bucket=p.bucket, fallbacks=fallbacks, span=self.span)
        replica, response = attempt.replica, attempt.response
        ctx.engine = replica.name
        ctx.version = replica.deployment.version.name
        ctx.upstream_status = response.status
        try:  # open() counted the attempt in replica.in_flight; release() gives it back
            if response.status != 200:
                # A refusal of this request, relayed; anything else is the engine's failure.
                self._outcome = "engine_4xx" if _refusal(response.status) else "engine_error"
                await self._relay_error(send, response)
            elif p.stream:
                await self._relay_stream(send, response, attempt.first, replica)
            else:
                await self._relay_body(send, response)
        except TIMEOUTS:
            self._outcome = "broken"
            raise EngineTimeout(f"The engine for '{p.route.name}' stopped answering.") from None
        except aiohttp.ClientError:
            self._outcome = "broken"
            raise EngineBadResponse(
                f"The engine for '{p.route.name}' closed the connection.") from None
        finally:
            self.upstream.release(replica, attempt.route, self._outcome, attempt.probe,
                                  attempt.span)
            # When the client left, this closes the connection, which is what tells vLLM to
            # abort. A fully read response goes back to the pool instead.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _relay_body(self, send: Send, response: aiohttp.ClientResponse) -> None:
        body = await response.read()
        self._outcome = "ok"
        self.ctx.prompt_tokens, self.ctx.completion_tokens = usage_from_body(body)
        output = self.output
        if output is not None:
            body = output.body(body)  # may refuse a tool call: nothing is sent yet
            self.ctx.response_text = output.response_text
        self.gate.reckon(self.admission, self.ctx)
        if self.claim is not None:  # kept before the client has it: a duplicate finds it
            await self.claim.complete(200, body, self.parsed.route.name)
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._served([_JSON, (b"content-length",
                                                     str(len(body)).encode())])})
        await send({"type": "http.response.body", "body": body})

    async def _relay_stream(self, send: Send, response: aiohttp.ClientResponse, first: bytes,
                            replica: Replica) -> None:
        output = self.output
        acct = StreamAccountant(strip_usage_event=not self.parsed.client_wants_usage,
                                chunk_usage=self.parsed.chunk_usage,
                                transform=output.events if output is not None else None,
                                choices_per_prompt=self.parsed.n)
        started = False
        stall = self.upstream.watch(replica)  # a hung engine ends the stream, not the client
        try:
            async for chunk in _chunks(first, response):
                stall.touch()
                out = acct.feed(chunk)
                if not out:
                    continue
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200,
                                "headers": self._served(_SSE_HEADERS)})
                await send({"type": "http.response.body", "body": out, "more_body": True})
                # Neither call suspends while the engine's bytes are buffered and the client's
                # socket takes them: without a yield, one fast stream holds the event loop and
                # every other request (admin, health checks, other streams) waits behind it.
                await asyncio.sleep(0)
            stall.cancel()
            self._outcome = "ok"
            rest = acct.flush()
            if not started:
                await send({"type": "http.response.start", "status": 200,
                            "headers": self._served(_SSE_HEADERS)})
            self._settle(acct)  # the audit record, written before the last byte, reads them
            await send({"type": "http.response.body", "body": rest, "more_body": False})
        except asyncio.CancelledError:
            stall.cancel()
            task = asyncio.current_task()
            assert task is not None
            if not stall.fired or self.ctx.client_disconnected or task.uncancel() > 0:
                raise
            self._outcome = "first_byte_timeout"  # the engine stopped answering mid-stream
            await self._broken(send, acct, started)
        except TRANSPORT_ERRORS:
            stall.cancel()
            self._outcome = "broken"
            await self._broken(send, acct, started)
        except ToolCallRefused as exc:
            stall.cancel()
            self._outcome = "ok"  # the engine answered; the policy refused the answer
            if not started:
                raise
            self.ctx.error_code = exc.log_code  # the error event below says why
            await self._end_with_error(send, acct, exc.message, exc.type, exc.log_code)
        finally:
            stall.cancel()
            self._settle(acct)

    async def _broken(self, send: Send, acct: StreamAccountant, started: bool) -> None:
        """The engine failed after the first chunk: it cannot be retried elsewhere (the
        client may have part of the answer). End the stream with an OpenAI-style error event."""
        if not started:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self._served(_SSE_HEADERS)})
        self.ctx.error_code = "engine_stream_broken"
        await self._end_with_error(send, acct, "The engine stopped mid-stream.",
                                   "upstream_error", "engine_stream_broken")

    def _served(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The version that answered (a rollout's canary or the stable one), and, when a
        fallback model answered, which (the body's ``model`` is the engine's own name)."""
        out = headers
        if self.ctx.version is not None:
            out = [*out, (b"x-enclave-model-version", self.ctx.version.encode())]
        served = self.ctx.served_model
        if served is not None:
            out = [*out, (b"x-enclave-served-model", served.encode())]
        return out

    def _settle(self, acct: StreamAccountant) -> None:
        """The stream's usage, first-token time and kept text, and what the request will be
        charged: known before its last byte (the audit record is written then). Once."""
        if self._settled:
            return
        self._settled = True
        self.ctx.prompt_tokens = acct.prompt_tokens
        self.ctx.completion_tokens = acct.completion_tokens
        if acct.first_event_at is not None:
            self.ctx.ttft_s = acct.first_event_at - self.ctx.started
        if self.output is not None:
            self.output.finish()
            self.ctx.response_text = self.output.response_text
        self.gate.reckon(self.admission, self.ctx)

    async def _end_with_error(self, send: Send, acct: StreamAccountant, message: str,
                              type_: str, code: str) -> None:
        err = error_bytes(message, type_, code=code)
        self._settle(acct)
        await send({"type": "http.response.body", "body": b"data: " + err + b"\n\n",
                    "more_body": False})

    async def _relay_error(self, send: Send, response: aiohttp.ClientResponse) -> None:
        """An engine's 4xx reaches the client in the gateway's own words (never the engine's
        message, which quotes the refused values); anything else becomes a 502."""
        body = await _read_capped(response)
        status = response.status
        if _refusal(status):
            self.ctx.error_code = f"upstream_{status}"  # answered here, not by routes.errors
            self.gate.reckon(self.admission, self.ctx)
            param = {"chat": "messages", "completions": "prompt"}.get(self.parsed.endpoint,
                                                                      "input")
            body = client_error(body, status, param)
            headers = [_JSON, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        raise EngineBadResponse(
            f"The engine for '{self.parsed.route.name}' failed ({status}).")


def _refusal(status: int) -> bool:
    """The engine refused this request (relayed to the client in the gateway's words), as
    opposed to failing (401/403 from an engine is the gateway's fault, not the client's)."""
    return 400 <= status < 500 and status not in (401, 403)


async def _chunks(first: bytes, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    yield first
    async for chunk in response.content.iter_any():
        yield chunk


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_UPSTREAM_ERROR_BODY:
            break
    return b"".join(chunks)[:_MAX_UPSTREAM_ERROR_BODY]
