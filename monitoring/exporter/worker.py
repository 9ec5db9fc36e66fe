"""A daemon thread that stops when asked: the XID watcher and the PCIe sampler."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod


class Worker(ABC):
    name = "worker"
    join_timeout_s = 2.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def _run(self) -> None:
        """The thread's body: loop until ``self._stop`` is set."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
