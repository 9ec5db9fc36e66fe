"""Opening a request to an engine: pick a healthy engine, connect, map transport failures.

Connect failures mark the engine down and move on to another healthy version of the model;
when none is left the caller gets ``EngineUnavailable`` (503 + Retry-After). A timeout while
waiting for the engine is ``EngineTimeout`` (504). Only the fixed paths in ``requests.PATHS``
are ever requested: nothing the client sends chooses the upstream path or query.
"""

from __future__ import annotations

import httpx

from serving.errors import EngineTimeout, EngineUnavailable
from serving.services.engines import EnginePool, EngineState, ModelRoute


class Upstream:
    def __init__(self, client: httpx.AsyncClient, pool: EnginePool, *, retry_after_s: int,
                 connect_retries: int) -> None:
        self._client = client
        self._pool = pool
        self._retry_after = retry_after_s
        self._retries = connect_retries

    def unavailable(self, model: str) -> EngineUnavailable:
        return EngineUnavailable(
            f"The model '{model}' has no engine available right now. Retry later.",
            self._retry_after)

    async def open(self, route: ModelRoute, path: str, body: bytes,
                   request_id: str) -> tuple[EngineState, httpx.Response]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        tried: set[str] = set()
        for _ in range(self._retries + 1):
            engine = route.pick()
            if engine is None or (engine.name in tried and len(tried) >= len(route.engines)):
                break
            tried.add(engine.name)
            request = self._client.build_request(
                "POST", engine.base_url + path, content=body, headers=headers)
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._pool.mark_down(engine, type(exc).__name__)
                continue
            except httpx.TimeoutException:
                raise EngineTimeout(
                    f"The engine for '{route.name}' did not answer in time.") from None
            except httpx.TransportError as exc:
                self._pool.mark_down(engine, type(exc).__name__)
                continue
            return engine, response
        raise self.unavailable(route.name)
