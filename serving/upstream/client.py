"""Opening a request to an engine: pick a healthy engine, connect, map transport failures.

The hot path uses aiohttp's client: on the hosts we measured it costs a quarter of httpx's time
per proxied request (see the README's benchmark). Connect failures mark the engine down and
move on to another healthy version of the model; when none is left the caller gets
``EngineUnavailable`` (503 + Retry-After). A timeout waiting for the engine is
``EngineTimeout`` (504). Only the fixed paths in ``contract.PATHS`` are ever requested: nothing
the client sends chooses the upstream path or query.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from serving.errors import EngineTimeout, EngineUnavailable
from serving.upstream.pool import EnginePool, EngineState, ModelRoute

# Failures that happen before the engine has the request: safe to try another engine.
CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                  aiohttp.ClientOSError)
TIMEOUTS = (asyncio.TimeoutError, aiohttp.ServerTimeoutError)
TRANSPORT_ERRORS = (aiohttp.ClientError, *TIMEOUTS)


def new_session(connect_timeout_s: float, read_timeout_s: float,
                keepalive_s: float = 4.0) -> aiohttp.ClientSession:
    # Idle connections are dropped before the engine drops them (vLLM's keep-alive is 5 s): a
    # request sent on a connection the engine is closing fails after the engine had it.
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=keepalive_s,
                                     ttl_dns_cache=None, use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                    sock_read=read_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 auto_decompress=False, skip_auto_headers=("User-Agent",))


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, pool: EnginePool, *, retry_after_s: int,
                 connect_retries: int) -> None:
        self._session = session
        self._pool = pool
        self._retry_after = retry_after_s
        self._retries = connect_retries

    def unavailable(self, model: str) -> EngineUnavailable:
        return EngineUnavailable(
            f"The model '{model}' has no engine available right now. Retry later.",
            self._retry_after)

    async def open(self, route: ModelRoute, path: str, body: bytes, request_id: str,
                   pinned: EngineState | None = None) -> tuple[EngineState, aiohttp.ClientResponse]:
        """``pinned``: the one engine to use (a version the client named, even at traffic weight
        0, for canary checks); no other version is tried for it. Otherwise a weighted pick,
        moving to another healthy version (never one already tried) when a connect fails.

        The engine's ``in_flight`` counts the request from before it is sent (a non-streamed
        answer's headers come only when generation ends; draining must see it all along); the
        caller decrements it when the exchange ends."""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        tried: set[str] = set()
        for _ in range(1 if pinned is not None else self._retries + 1):
            if pinned is not None:
                engine = pinned if pinned.healthy and not pinned.draining else None
            else:
                engine = route.pick(exclude=tried)
            if engine is None:
                break
            tried.add(engine.name)
            engine.in_flight += 1
            try:
                response = await self._session.post(engine.base_url + path, data=body,
                                                    headers=headers, allow_redirects=False)
            except TIMEOUTS:
                engine.in_flight -= 1
                raise EngineTimeout(
                    f"The engine for '{route.name}' did not answer in time.") from None
            except CONNECT_ERRORS as exc:
                engine.in_flight -= 1
                self._pool.mark_down(engine, type(exc).__name__)
                continue
            except BaseException:
                engine.in_flight -= 1
                raise
            return engine, response
        raise self.unavailable(route.name)

    async def count_tokens(self, route: ModelRoute, body: bytes, request_id: str,
                           pinned: EngineState | None = None) -> int | None:
        """A prompt's length in the model's own tokens, from the engine's ``/tokenize`` (the
        chat template included for messages); None when no engine could say."""
        engine = pinned if pinned is not None and pinned.healthy else route.pick(exclude=set())
        if engine is None:
            raise self.unavailable(route.name)
        headers = {"content-type": "application/json", "x-request-id": request_id}
        try:
            async with self._session.post(engine.base_url + "/tokenize", data=body,
                                          headers=headers, allow_redirects=False) as response:
                if response.status != 200:
                    return None
                result = orjson.loads(await response.read())
        except (*TRANSPORT_ERRORS, orjson.JSONDecodeError):
            return None
        count = result.get("count") if isinstance(result, dict) else None
        return count if isinstance(count, int) else None
