"""Running a request's CPU-bound preparation (parsing, scanning, redacting) off the event loop
when the request is large.

Small bodies are prepared inline: a thread hop costs more than the work. Above
``inline_bytes`` the work goes to a small pool of worker threads, so that one megabyte of text
to scan delays no other client: the event loop keeps answering while the worker runs (Python's
regular expressions hold the interpreter lock for one search at a time, which the loop
interleaves with), and the per-request deadline the work checks bounds how long it may take.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


# How long a worker may hold the interpreter before the event loop gets it back. Python's
# default (5 ms) makes every step of another client's request (read, route, write) wait up to
# that long while a worker scans: a health check took 60 ms. At 1 ms it takes a few.
SWITCH_INTERVAL_S = 0.001


class Offload:
    def __init__(self, workers: int, inline_bytes: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
        self._inline = inline_bytes

    @staticmethod
    def share_the_interpreter() -> None:
        """Set the process's thread switch interval (once, when the gateway starts)."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    async def run(self, size: int, work: Callable[[], T]) -> T:
        if size <= self._inline:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
