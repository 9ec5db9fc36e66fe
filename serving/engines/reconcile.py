"""The supervisor's replicas, kept in step with the manifests while it runs (``update``).

A new replica starts (its weights verified first) without touching the others; one no longer
wanted is drained like ``drain`` and then leaves for good; a change to a running replica's
command line or environment waits for a restart (it is logged, never applied by restarting
it). ``LiveReplicas`` holds this; ``supervisor.Supervisor`` is one, and gives it the engines
and what is done to them (start, publish a state, wait for idle, stop).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from serving.domain.manifest import Deployment
from serving.engines.process import EngineProcess, WeightsError, verify_weights

log = logging.getLogger("enclave.supervisor")


class LiveReplicas(abc.ABC):
    """The replicas the deployments want, changed while running (``update``)."""

    # The supervisor's, read and changed here.
    engines: list[EngineProcess]
    _resolve_dir: Callable[[Deployment], Path]
    _stopping: asyncio.Event
    _started: bool
    _tasks: dict[EngineProcess, asyncio.Task[None]]

    def __init__(self) -> None:
        self._updating = asyncio.Lock()
        self._wanted: list[Deployment] | None = None  # the set ``update`` was last given
        self._retiring: dict[EngineProcess, asyncio.Task[None]] = {}
        self._pending: dict[str, Deployment] = {}  # changes waiting for a restart (warned)

    async def update(self, deployments: list[Deployment]) -> None:
        """Run what ``deployments`` want, never restarting or pausing a replica that stays.

        A wanted replica that is not running starts (its version's weights verified first: a
        version that fails is not started, and the error names the file). One no longer wanted
        (its version retired, staged or gone, or fewer replicas) is drained like ``drain``, in
        a task of its own, then leaves. A running replica whose command line or environment
        would change keeps running as it is ("restart to apply"); any other change (traffic
        weights, metadata) is taken in place."""
        async with self._updating:
            if self._stopping.is_set():
                return
            self._wanted = deployments
            wanted = {dep.replica_name(index): (dep, index, port, devices)
                      for dep in deployments
                      for index, port, devices in dep.version.engine.local_replicas()}
            for engine in list(self.engines):
                if engine.name not in wanted and engine not in self._retiring:
                    self._retire(engine)
            new: dict[str, list[tuple[Deployment, int, int, str | None]]] = {}
            for name, (dep, index, port, devices) in wanted.items():
                running = self.replica(name)
                if running is None:
                    new.setdefault(dep.name, []).append((dep, index, port, devices))
                elif running not in self._retiring:  # else started again once stopped
                    self._reconcile(running, dep, port, devices)
            for replicas in new.values():
                await self._add(replicas)

    def _reconcile(self, engine: EngineProcess, dep: Deployment, port: int,
                   devices: str | None) -> None:
        if dep == engine.deployment and port == engine.port and devices == engine.devices:
            self._pending.pop(engine.name, None)
            return
        old, now = engine.deployment.version, dep.version
        changes = [what for what, a, b in (
            ("port", engine.port, port), ("devices", engine.devices, devices),
            ("source", old.source, now.source), ("sha256", old.sha256, now.sha256),
            *((f"engine.{f}", getattr(old.engine, f), getattr(now.engine, f))
              for f in ("args", "env", "max_model_len", "shutdown_timeout_s"))) if a != b]
        if not changes:
            engine.deployment = dep
            self._pending.pop(engine.name, None)
            return
        if self._pending.get(engine.name) != dep:
            self._pending[engine.name] = dep
            log.warning("replica changed in its manifest; restart to apply", extra={
                "engine": engine.name, "changed": changes})

    async def _add(self, replicas: list[tuple[Deployment, int, int, str | None]]) -> None:
        """New replicas of one deployment, started once its weights check out."""
        dep = replicas[0][0]
        same = next((e for e in self.engines if e.deployment.name == dep.name
                     and e.deployment.version.source == dep.version.source
                     and e.deployment.version.sha256 == dep.version.sha256), None)
        if same is not None:  # verified when it started
            model_dir = same.model_dir
        else:
            try:
                model_dir = await asyncio.to_thread(self._resolve_dir, dep)
                await asyncio.to_thread(verify_weights, model_dir, dep.version.sha256)
            except (WeightsError, OSError, subprocess.SubprocessError) as exc:
                log.error("weights check failed; the version is not started", extra={
                    "deployment": dep.name, "error": str(exc)})
                return
        if self._stopping.is_set():
            return
        for _, index, port, devices in replicas:
            engine = self._engine(dep, index, port, devices, model_dir)
            self.engines.append(engine)
            if self._started:
                self._tasks[engine] = self._spawn(engine)
            log.info("replica added", extra={"engine": engine.name, "port": port,
                                             "devices": devices})
        self._write_state()

    def _retire(self, engine: EngineProcess) -> None:
        """A replica no longer wanted, drained like ``drain``: gateways hear ``draining`` now;
        the engine finishes its requests (up to its version's shutdown timeout) in a task of
        its own, then is gone."""
        deadline_s = float(engine.deployment.version.engine.shutdown_timeout_s)
        serving = engine.state == "healthy"  # else it has no request to finish
        engine.held = True  # its keep-alive starts nothing new
        engine.resume.clear()
        self._set(engine, "draining")
        log.info("replica no longer wanted; draining", extra={
            "engine": engine.name, "deadline_s": deadline_s})
        self._retiring[engine] = asyncio.create_task(
            self._retired(engine, serving, time.monotonic() + deadline_s),
            name=f"retire-{engine.name}")

    async def _retired(self, engine: EngineProcess, serving: bool, deadline: float) -> None:
        """Once idle (or at ``deadline``): stopped, a last ``stopped`` event, and out of
        ``engines`` and engines.json."""
        started = time.monotonic()
        try:
            idle = await self._until_idle(engine, deadline) if serving else True
            await self._terminate(engine)
            task = self._tasks.pop(engine, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._set(engine, "stopped")  # the last word, whatever its keep-alive said
            self.engines.remove(engine)
            self._pending.pop(engine.name, None)
            self._write_state()
            log.info("replica removed", extra={
                "engine": engine.name, "idle_at_stop": idle,
                "waited_s": round(time.monotonic() - started, 3)})
        finally:
            self._retiring.pop(engine, None)
        wanted = self._wanted or []
        if not self._stopping.is_set() and any(
                engine.name == d.replica_name(i) for d in wanted
                for i, _, _ in d.version.engine.local_replicas()):
            await self.update(wanted)  # wanted again while it was stopping: a fresh one

    # -- what the supervisor does to its engines --------------------------------------------

    @abc.abstractmethod
    def replica(self, name: str) -> EngineProcess | None:
        """The replica of that name."""

    @abc.abstractmethod
    def _engine(self, dep: Deployment, index: int, port: int, devices: str | None,
                model_dir: Path) -> EngineProcess:
        """A replica of ``dep``, not started."""

    @abc.abstractmethod
    def _spawn(self, engine: EngineProcess) -> asyncio.Task[None]:
        """Its keep-alive, started."""

    @abc.abstractmethod
    def _set(self, engine: EngineProcess, state: str) -> None:
        """Its state, published (engines.json, the control socket's listeners)."""

    @abc.abstractmethod
    async def _until_idle(self, engine: EngineProcess, deadline: float) -> bool:
        """Until it has no request running or waiting (True), or ``deadline`` (False)."""

    @abc.abstractmethod
    async def _terminate(self, engine: EngineProcess, final_state: str = "stopped") -> None:
        """Stopped: SIGTERM, its requests' time to finish, then SIGKILL."""

    @abc.abstractmethod
    def _write_state(self) -> None:
        """engines.json, rewritten."""
