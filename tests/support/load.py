"""Steady mixed load for the replica tests: ``concurrency`` clients, each sending chat requests
back to back (every other one streamed) for ``seconds``, while ``events`` (at a second, a
function) happen. Every request's start, duration and how it ended is kept."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass
class Sent:
    start: float  # time.monotonic()
    duration: float
    stream: bool
    status: int | str  # the HTTP status, or the exception's name
    complete: bool  # a 200 answer that ended properly ([DONE] for a stream)
    text: str
    version: str | None = None  # the model version that answered (x-enclave-model-version)
    conversation: int | None = None
    wall: float = 0.0  # time.time() at the start


def run_load(url: str, key: str, seconds: float, concurrency: int = 8,
             events: list[tuple[float, Callable[[], object]]] | None = None,
             max_tokens: int = 12, body: dict[str, object] | None = None,
             conversations: int | list[str] | None = None,
             stop: threading.Event | None = None) -> list[Sent]:
    """``conversations``: the clients go round that many conversations, or these first
    messages (each request is a later turn of one: the same first message, then more);
    ``stop``: end early when set."""
    openers = ([f"conversation {k}" for k in range(conversations)]
               if isinstance(conversations, int) else conversations)
    results: list[Sent] = []
    turn = iter(range(1 << 62))

    async def client(c: httpx.AsyncClient, i: int, until: float) -> None:
        n = 0
        while time.monotonic() < until and not (stop is not None and stop.is_set()):
            n += 1
            stream = n % 2 == 0
            conversation = None
            messages = [{"role": "user", "content": f"load {i} {n}"}]
            if openers:
                k = next(turn)
                conversation = k % len(openers)
                messages = [{"role": "user", "content": openers[conversation]},
                            {"role": "assistant", "content": "ok"},
                            {"role": "user", "content": f"turn {k // len(openers)}"}]
            payload = {"model": "demo-chat", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": stream, "messages": messages, **(body or {})}
            stream = bool(payload["stream"])
            start, wall, version = time.monotonic(), time.time(), None
            try:
                if stream:
                    async with c.stream("POST", url + "/v1/chat/completions", json=payload,
                                        headers={"Authorization": f"Bearer {key}"}) as r:
                        text = "".join([t async for t in r.aiter_text()])
                        version = r.headers.get("x-enclave-model-version")
                    complete = (r.status_code == 200 and "data: [DONE]" in text
                                and 'data: {"error"' not in text)
                    status: int | str = r.status_code
                else:
                    r = await c.post(url + "/v1/chat/completions", json=payload,
                                     headers={"Authorization": f"Bearer {key}"})
                    text, status = r.text, r.status_code
                    version = r.headers.get("x-enclave-model-version")
                    complete = status == 200 and '"choices"' in text
            except httpx.HTTPError as exc:
                text, status, complete = "", type(exc).__name__, False
            results.append(Sent(start, time.monotonic() - start, stream, status, complete,
                                text[-400:], version, conversation, wall))

    async def main() -> None:
        until = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = [asyncio.create_task(client(c, i, until)) for i in range(concurrency)]
            await asyncio.gather(*tasks)

    timers = []
    started = time.monotonic()
    for at, fn in events or []:
        timer = threading.Timer(max(at - (time.monotonic() - started), 0), fn)
        timer.start()
        timers.append(timer)
    try:
        asyncio.run(main())
    finally:
        for timer in timers:
            timer.join()
    return results


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
