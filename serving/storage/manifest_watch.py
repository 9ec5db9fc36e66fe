"""The manifests in ``models/``, watched: a new or changed set is read, validated as a whole
and handed on; a bad one is refused with its file and field, and the running set stays.

Polling is cheap: the name, mtime and size of every ``*.yaml`` (one ``stat`` each); only when
that fingerprint changes are the files read and validated (``load_manifests``, in a thread),
and only a set that differs from the one last applied reaches ``on_change``. A refusal is
logged once per distinct error, not at every poll. It never applies part of a set.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from serving.domain.manifest import Manifest, ManifestError
from serving.storage.manifests import load_manifests

log = logging.getLogger("enclave.manifests")
Fingerprint = tuple[tuple[str, int, int], ...]
OnChange = Callable[[list[Manifest]], Awaitable[None] | None]


def fingerprint(directory: Path) -> Fingerprint:
    """(name, mtime_ns, size) of every manifest file; a file that vanishes mid-scan is left out
    (the next poll sees the directory as it settled)."""
    found = []
    try:
        paths = sorted(directory.glob("*.yaml"))
    except OSError:
        return ()
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        found.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(found)


def _dump(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    return {m.name: m.model_dump() for m in manifests}


class ManifestWatcher:
    def __init__(self, models_dir: Path, on_change: OnChange, interval_s: float = 2.0, *,
                 applied: list[Manifest] | None = None) -> None:
        """``applied``: the set already in force (loaded at start); None: the first valid set
        read is handed to ``on_change``, which must then accept a set equal to its own."""
        self.models_dir = models_dir
        self.on_change = on_change
        self.interval_s = interval_s
        self.last_error: str | None = None  # the refusal in force: the running set is older
        self.applied_at: float | None = None  # time.time() of the last set applied
        self._applied = _dump(applied) if applied is not None else None
        self._seen: Fingerprint | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a receiver's failure: the next change is tried again
                log.exception("manifests not applied", extra={
                    "models_dir": str(self.models_dir)})
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> bool:
        """Look once; True when a new set was applied."""
        stamp = await asyncio.to_thread(fingerprint, self.models_dir)
        if stamp == self._seen:
            return False
        try:
            manifests = await asyncio.to_thread(load_manifests, self.models_dir)
        except ManifestError as exc:
            self._seen = stamp  # the same files refuse the same way: read them again on change
            self._refuse(str(exc))
            return False
        dumped = _dump(manifests)
        if dumped == self._applied:
            self._seen = stamp
            self._clear_error()
            return False
        try:
            result = self.on_change(manifests)
            if inspect.isawaitable(result):
                await result
        except ValueError as exc:  # the receiver refused the set as a whole (e.g. plain HTTP)
            self._seen = stamp
            self._refuse(str(exc))
            return False
        first = self._applied is None
        changed = sorted(name for name in dumped.keys() | (self._applied or {}).keys()
                         if dumped.get(name) != (self._applied or {}).get(name))
        self._seen, self._applied = stamp, dumped
        self.applied_at = time.time()
        self._clear_error()
        if not first:
            log.info("manifests applied", extra={"models_dir": str(self.models_dir),
                                                 "changed": changed})
        return True

    def _refuse(self, message: str) -> None:
        if message != self.last_error:
            log.warning("manifests refused; the running set stays", extra={
                "models_dir": str(self.models_dir), "problem": message})
        self.last_error = message

    def _clear_error(self) -> None:
        if self.last_error is not None:
            log.info("manifests valid again", extra={"models_dir": str(self.models_dir)})
        self.last_error = None
