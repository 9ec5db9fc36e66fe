"""Sending a request to a replica: attempts, retries, fallbacks, and what each outcome means.

The hot path uses aiohttp's client: on the hosts we measured it costs a quarter of httpx's time
per proxied request (see the README's benchmark). Only the fixed paths in ``contract.PATHS``
are ever requested: nothing the client sends chooses the upstream path or query.

``Upstream.open`` runs attempts until one has its first byte: the response headers for an
answer, and the first chunk too for a stream (the relay sends the client nothing before that,
so until then another replica can still take the request). Each attempt has

- a connect timeout (the session's); a refused or timed-out connection ejects the replica at
  once;
- a first-byte timeout that knows whether the replica is alive: the attempt is abandoned when
  ``first_byte_timeout_s`` has passed since the later of its start and the replica's last sign
  of life (a health check answered, another attempt's first byte). A live engine generating a
  long non-streamed answer is never cut off; a hung one (SIGSTOP, a stuck GPU) loses its
  requests to another replica within the timeout;
- an engine 5xx, or a connection lost before the first byte, counts toward ejection.

A failed attempt is retried on a replica not yet tried, at most ``max_attempts`` in all, and
(except a refused connection, which no engine ever saw) only while the model's retry budget
lasts. When no replica of the model is available at all, the client's fallback models are
tried in order (``fallbacks``); the context records which model answered and why.

``release`` ends an attempt in every exit path: the replica's in-flight count given back, the
outcome counted, the replica credited or charged with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from serving import tracing
from serving.domain.outcome import RequestContext
from serving.errors import EngineBadResponse, EngineTimeout, EngineUnavailable, GatewayError
from serving.metrics import GatewayMetrics
from serving.tracing import UNTRACED, Span
from serving.upstream.affinity import Prefix
from serving.upstream.pool import EnginePool, ModelRoute, VersionGroup
from serving.upstream.replicas import Replica

TIMEOUTS = (asyncio.TimeoutError, aiohttp.ServerTimeoutError)
TRANSPORT_ERRORS = (aiohttp.ClientError, *TIMEOUTS)
_DRAIN_ERROR_BODY = 64 * 1024


def new_session(connect_timeout_s: float, read_timeout_s: float,
                keepalive_s: float = 4.0, tls: ssl.SSLContext | None = None
                ) -> aiohttp.ClientSession:
    # Idle connections are dropped before the engine drops them (vLLM's keep-alive is 5 s): a
    # request sent on a connection the engine is closing fails after the engine had it.
    # No pool limit (the gateway's own ceiling on requests in progress bounds it), and the
    # connect timeout on the socket's connect alone: a wait for a pooled connection must never
    # read as an engine that cannot be reached (that ejects it).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=keepalive_s,
                                     ttl_dns_cache=None, use_dns_cache=False,
                                     ssl=tls if tls is not None else True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                    sock_read=read_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 auto_decompress=False, skip_auto_headers=("User-Agent",))


class _FirstByteTimeout(Exception):
    pass


class LivenessWatch:
    """Cancels ``task`` when the replica has shown no life for ``limit`` seconds since the
    watch began or was last ``touch``ed (a stream's chunk): the first-byte timeout of an
    attempt, and the stall timeout of a stream being relayed."""

    __slots__ = ("_handle", "_limit", "_loop", "_replica", "_started", "_task", "fired")

    def __init__(self, replica: Replica, limit: float, task: asyncio.Task[object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._replica = replica
        self._limit = limit
        self._task = task
        self._started = time.monotonic()  # the clock of ``Replica.last_alive``
        self.fired = False
        self._handle = self._loop.call_later(limit, self._check)

    def _check(self) -> None:
        due = max(self._started, self._replica.last_alive) + self._limit
        now = time.monotonic()
        if now < due:
            self._handle = self._loop.call_later(due - now, self._check)
            return
        self.fired = True
        self._task.cancel()

    def touch(self) -> None:
        self._started = time.monotonic()

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(slots=True)
class Attempt:
    replica: Replica
    response: aiohttp.ClientResponse
    first: bytes  # a stream's first chunk, already read; b"" otherwise
    route: ModelRoute  # the model that answers (a fallback's, when one did)
    probe: bool  # the half-open request of an ejected replica
    span: Span  # the attempt's, ended by ``release``


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, pool: EnginePool, metrics: GatewayMetrics,
                 *, retry_after_s: int, max_attempts: int, first_byte_timeout_s: float,
                 on_failed_attempt: Callable[[str, str], None] | None = None) -> None:
        self._session = session
        # (model, version) of each attempt that failed: a rollout counts the canary's failures
        # even when a retry elsewhere hid them from the client.
        self._on_failed = on_failed_attempt
        self._pool = pool
        self._metrics = metrics
        self._retry_after = retry_after_s
        self._max_attempts = max_attempts
        self._first_byte = first_byte_timeout_s

    def watch(self, replica: Replica) -> LivenessWatch:
        """A stall watch on the current task, for relaying a stream from ``replica``."""
        task = asyncio.current_task()
        assert task is not None
        return LivenessWatch(replica, self._first_byte, task)

    def unavailable(self, model: str) -> EngineUnavailable:
        return EngineUnavailable(
            f"The model '{model}' has no engine available right now. Retry later.",
            self._retry_after)

    async def open(self, route: ModelRoute, path: str, body: bytes, ctx: RequestContext, *,
                   stream: bool, pinned: VersionGroup | None = None,
                   prefix: Prefix | None = None, bucket: int | None = None,
                   fallbacks: Sequence[tuple[ModelRoute, Callable[[], bytes]]] = (),
                   span: Span = UNTRACED) -> Attempt:
        """The first attempt that gets its first byte; raises ``GatewayError`` when none
        does. ``pinned``: the one version to use (``model@version``, even at traffic weight
        0); never a fallback for it. ``fallbacks``: other models, each with its body."""
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        metrics = self._metrics
        tried: list[Replica] = []
        failure: GatewayError | None = None
        route.budget.deposit()
        remaining = list(fallbacks) if pinned is None else []
        while True:
            replica, affinity = route.pick(tried, pinned, prefix, bucket)
            if affinity is not None:
                metrics.count_affinity(route.name, affinity)
            if replica is None:
                if not tried and remaining:  # every replica of the model is out
                    fallback, make_body = remaining.pop(0)
                    if not fallback.ready():
                        continue
                    metrics.count_fallback(route.name, fallback.name)
                    ctx.served_model = fallback.name
                    ctx.fallback_reason = f"no replica of '{route.name}' available"
                    route, body, prefix = fallback, make_body(), None
                    continue
                raise failure or self.unavailable(ctx.served_model or route.name)
            tried.append(replica)
            ctx.attempts += 1
            probe = replica.probing  # pick() set it: this attempt is the probe
            child = span.child(tracing.UPSTREAM_ATTEMPT, {
                tracing.REPLICA: replica.name, tracing.ATTEMPT: ctx.attempts,
                tracing.MODEL: route.name, **({tracing.RETRY_REASON: ctx.retried[-1]}
                                              if ctx.retried else {})}, client=True)
            traceparent = child.traceparent()
            if traceparent is not None:
                headers["traceparent"] = traceparent
            try:
                response, first = await self._attempt(replica, path, body, headers, stream)
            except _Failed as failed:
                self.release(replica, route, failed.outcome, probe, child)
                if self._on_failed is not None:
                    self._on_failed(route.name, replica.deployment.version.name)
                failure = failed.error(route.name)
                if not self._may_retry(route, failed.outcome, len(tried)):
                    raise failure from None
                ctx.retried.append(failed.outcome)
                metrics.count_retry(route.name, failed.outcome)
                continue
            except BaseException:
                self.release(replica, route, "client_gone", probe, child)
                raise
            replica.last_alive = time.monotonic()
            child.set(tracing.HTTP_STATUS, response.status)
            return Attempt(replica, response, first, route, probe, child)

    def _may_retry(self, route: ModelRoute, outcome: str, attempts: int) -> bool:
        if attempts >= self._max_attempts or outcome == "read_timeout":
            return False
        if outcome == "connect_error":  # no engine saw it: costs nothing but the round trip
            return True
        if route.budget.withdraw():
            return True
        self._metrics.count_budget_exhausted(route.name)
        return False

    async def _attempt(self, replica: Replica, path: str, body: bytes,
                       headers: dict[str, str], stream: bool
                       ) -> tuple[aiohttp.ClientResponse, bytes]:
        task = asyncio.current_task()
        assert task is not None
        watch = LivenessWatch(replica, self._first_byte, task)
        response = None
        if replica.server_hostname is not None:  # reached by address: the name, as vhost
            headers = {**headers, "host": f"{replica.server_hostname}:{replica.port}"}
        try:
            response = await self._session.post(
                replica.base_url + path, data=body, headers=headers, allow_redirects=False,
                server_hostname=replica.server_hostname)
            first = b""
            if response.status >= 500:  # read (under this watch) and dropped: retryable
                await _discard(response)
                raise _Failed("engine_5xx")
            if stream and response.status == 200:
                first = await response.content.readany()
                if not first:
                    raise aiohttp.ServerDisconnectedError()
            return response, first
        except asyncio.CancelledError:
            if response is not None:
                response.close()
            if watch.fired and task.uncancel() == 0:
                raise _Failed("first_byte_timeout") from None
            raise
        except aiohttp.ClientConnectorError as exc:
            outcome = ("connect_timeout" if isinstance(exc, aiohttp.ConnectionTimeoutError)
                       else "connect_error")
            raise _Failed(outcome) from None
        except aiohttp.ConnectionTimeoutError:
            raise _Failed("connect_timeout") from None
        except TIMEOUTS:
            # The read timeout, from a replica still alive (else the watch fires first): too
            # slow an answer, not a failed replica; not retried (it would run again).
            if response is not None:
                response.close()
            raise _Failed("read_timeout") from None
        except aiohttp.ClientError:
            if response is not None:
                response.close()
            raise _Failed("broken") from None
        finally:
            watch.cancel()

    def release(self, replica: Replica, route: ModelRoute, outcome: str, probe: bool,
                span: Span = UNTRACED) -> None:
        """An attempt ended (every exit path comes here once): in-flight given back, outcome
        counted, the replica credited or charged, its span ended."""
        replica.in_flight -= 1
        self._metrics.count_attempt(route.name, replica.name, outcome)
        span.set(tracing.OUTCOME, outcome)
        if outcome not in ("ok", "engine_4xx"):
            span.error(outcome)
        span.end()
        if outcome in ("ok", "engine_4xx"):
            replica.succeeded()
            return
        if outcome in ("client_gone", "read_timeout"):
            if probe:
                replica.probing = False  # the probe told nothing; the next request probes
            return
        replica.last_error = outcome
        immediate = outcome in ("connect_error", "connect_timeout", "first_byte_timeout")
        if outcome == "connect_error":
            self._pool.mark_down(replica, outcome)
        if replica.failed(immediate, self._pool.ejection, probe):
            self._metrics.count_ejection(route.name, replica.name,
                                         "probe_failed" if probe else outcome)

    async def count_tokens(self, route: ModelRoute, body: bytes, request_id: str,
                           pinned: VersionGroup | None = None) -> int | None:
        """A prompt's length in the model's own tokens, from an engine's ``/tokenize`` (the
        chat template included for messages); None when no engine could say. A replica that
        fails or hangs (the same liveness watch as an attempt) leaves it to one other."""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        task = asyncio.current_task()
        assert task is not None
        tried: list[Replica] = []
        for _ in range(2):
            replica, _ = route.pick(tried, pinned, None)
            if replica is None:
                if tried:
                    return None
                raise self.unavailable(route.name)
            tried.append(replica)
            probe = replica.probing
            watch = LivenessWatch(replica, self._first_byte, task)
            try:
                async with self._session.post(
                        replica.base_url + "/tokenize", data=body, headers=headers,
                        allow_redirects=False,
                        server_hostname=replica.server_hostname) as response:
                    if response.status != 200:
                        return None
                    result = orjson.loads(await response.read())
            except asyncio.CancelledError:
                if watch.fired and task.uncancel() == 0:
                    continue  # hung: another replica may say
                raise
            except (*TRANSPORT_ERRORS, orjson.JSONDecodeError):
                continue
            finally:
                watch.cancel()
                replica.in_flight -= 1
                if probe:
                    replica.probing = False  # a /tokenize answer proves little; a request probes
            count = result.get("count") if isinstance(result, dict) else None
            return count if isinstance(count, int) else None
        return None


class _Failed(Exception):
    """An attempt that failed before its first byte; ``outcome`` says how."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome

    def error(self, model: str) -> GatewayError:
        if self.outcome == "engine_5xx":
            return EngineBadResponse(f"The engine for '{model}' failed.")
        if self.outcome in ("first_byte_timeout", "read_timeout"):
            return EngineTimeout(f"The engine for '{model}' did not answer in time.")
        if self.outcome == "broken":
            return EngineBadResponse(f"The engine for '{model}' closed the connection.")
        return EngineUnavailable(f"The model '{model}' has no engine available right now. "
                                 "Retry later.", 5)


async def _discard(response: aiohttp.ClientResponse) -> None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        await response.content.read(_DRAIN_ERROR_BODY)
    response.close()
