"""The supervisor's sockets: replica events for gateways, drain and start for operators.

Two Unix sockets in the supervisor's run directory. ``supervisor.sock`` (mode 0600: only the
supervisor's own user) takes every request below; ``events.sock`` (mode 0660: the supervisor's
group, which a gateway running as another user joins) answers ``watch`` and ``status`` only, so
reading replica events never grants draining them. One JSON object per line. A client sends one
request:

- ``{"op": "watch"}``: the answer is ``{"event": "snapshot", "replicas": [...]}`` and then one
  ``{"event": "replica", ...}`` line each time a replica changes state (starting, healthy,
  draining, exited, backoff, held, stopped), for as long as the connection stays open. Gateways
  keep one open, so they learn of a dead replica when the supervisor sees its exit, not at
  their next health poll.
- ``{"op": "status"}``: the snapshot, then the connection closes.
- ``{"op": "drain", "replica": NAME, "deadline_s": S}``: answered when the replica has been
  drained and stopped (``Supervisor.drain``).
- ``{"op": "start", "replica": NAME}``: a drained replica runs again.

Errors come back as ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serving.engines.supervisor import Supervisor

log = logging.getLogger("enclave.supervisor")
MAX_LINE = 64 * 1024
MAX_DRAIN_S = 3600.0


READ_ONLY = frozenset({"watch", "status"})


def socket_path(run_dir: Path) -> Path:
    """Every operation: the supervisor's user only."""
    return run_dir / "supervisor.sock"


def events_path(run_dir: Path) -> Path:
    """Replica events and status only: the supervisor's group (gateways)."""
    return run_dir / "events.sock"


class ControlServer:
    def __init__(self, supervisor: Supervisor, path: Path,
                 ops: frozenset[str] | None = None, mode: int = 0o600) -> None:
        self.supervisor = supervisor
        self.path = path
        self.ops = ops  # None: every op
        self.mode = mode
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)  # never more open than 0600 while it is being made
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                op = request["op"]
            except (ValueError, KeyError, TypeError):
                await _send(writer, {"error": "send one JSON object with an 'op'"})
                return
            if self.ops is not None and op not in self.ops:
                await _send(writer, {"error": f"{op!r} is not served on this socket"})
            elif op == "watch":
                await self._watch(reader, writer)
            elif op == "status":
                await _send(writer, {"event": "snapshot", "replicas": self.supervisor.snapshot()})
            elif op == "drain":
                await _send(writer, await self._drain(request))
            elif op == "start":
                await _send(writer, self._start(request))
            else:
                await _send(writer, {"error": f"unknown op {str(op)[:40]!r}"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        unsubscribe = self.supervisor.subscribe(queue.put_nowait)
        try:
            await _send(writer, {"event": "snapshot", "replicas": self.supervisor.snapshot()})
            closed = asyncio.ensure_future(reader.read())  # EOF: the watcher went away
            while not closed.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                await _send(writer, {"event": "replica", **getter.result()})
        finally:
            unsubscribe()

    async def _drain(self, request: dict[str, Any]) -> dict[str, object]:
        name = request.get("replica")
        deadline = request.get("deadline_s", 300)
        if not isinstance(name, str) or not isinstance(deadline, int | float) or not (
                0 <= deadline <= MAX_DRAIN_S):
            return {"error": f"drain needs 'replica' and 'deadline_s' (0..{MAX_DRAIN_S:.0f})"}
        try:
            return await self.supervisor.drain(name, float(deadline))
        except LookupError:
            return {"error": f"no replica {name[:80]!r}"}

    def _start(self, request: dict[str, Any]) -> dict[str, object]:
        name = request.get("replica")
        if not isinstance(name, str):
            return {"error": "start needs 'replica'"}
        try:
            return self.supervisor.resume(name)
        except LookupError:
            return {"error": f"no replica {name[:80]!r}"}


async def _send(writer: asyncio.StreamWriter, message: dict[str, object]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def request(path: Path, message: dict[str, object]) -> dict[str, Any]:
    """One request to the supervisor and its one answer (drain, start, status)."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await reader.readline())
        return answer
    finally:
        writer.close()


async def watch(path: Path) -> AsyncIterator[dict[str, Any]]:
    """The supervisor's events, from the snapshot on; ends when the connection does."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    try:
        writer.write(b'{"op": "watch"}\n')
        await writer.drain()
        while line := await reader.readline():
            yield json.loads(line)
    finally:
        writer.close()
