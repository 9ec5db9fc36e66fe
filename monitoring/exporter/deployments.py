"""Which model deployment owns a GPU process, from the engine supervisor's ``engines.json``.

The supervisor starts each engine in its own session, so every process of an engine (vLLM's
API server and its EngineCore worker, which is the one holding GPU memory) has the engine's pid
as its session id. The file is re-read only when it changes (one ``stat`` per scrape).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

UNMANAGED = "unmanaged"  # a GPU process that is not one of this host's Enclave engines


class Deployments:
    def __init__(self, engines_file: Path | None) -> None:
        self.path = engines_file
        self._stamp: tuple[int, int] | None = None
        self._by_session: dict[int, str] = {}

    def owner(self, pid: int) -> str:
        """The deployment whose engine session ``pid`` belongs to, else ``unmanaged``."""
        if not self._by_session:
            return UNMANAGED
        name = self._by_session.get(pid)
        if name is not None:
            return name
        try:
            return self._by_session.get(os.getsid(pid), UNMANAGED)
        except OSError:  # gone, or in another pid namespace
            return UNMANAGED

    def refresh(self) -> None:
        """Re-read the file if it changed: once per scrape, by the collector."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except OSError:
            self._by_session, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # being replaced: keep the last good map, try again next scrape
        # the map first: a concurrent scrape that sees the new stamp must see the new map
        # Keyed by replica (demo-chat-v1/r0); labelled by its deployment (every replica of a
        # version is one deployment; its GPUs tell the replicas apart).
        self._by_session = {int(info["pid"]): str(info.get("deployment") or name)
                            for name, info in state.items()
                            if isinstance(info, dict) and isinstance(info.get("pid"), int)}
        self._stamp = stamp
