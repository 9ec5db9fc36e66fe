"""The engine supervisor: the local replicas of every deployment, each a vLLM server, kept alive.

For each deployment in the manifests it resolves and verifies the weights (sha256 pinned in the
manifest) and runs ``replicas`` engines (``python -m vllm.entrypoints.openai.api_server`` from
the engine environment, on ``port + i``, pinned to their own GPUs by ``CUDA_VISIBLE_DEVICES``
when the manifest lists devices). It waits for ``/health`` and restarts a replica that dies or
never becomes healthy, with exponential backoff and a log line that says why. Every engine gets
``--shutdown-timeout``: on SIGTERM it finishes the requests it has instead of aborting them.

Each engine runs in its own session (process group), so a terminal's Ctrl-C reaches only the
supervisor, which then stops engines in order; and an engine's worker processes die with it.
The supervisor writes ``engines.json`` (pid, port, state, restarts per replica) for the tools
that need to map processes to replicas (the GPU exporter, tests), and serves a control socket
(``control.py``): gateways watching it learn at once when a replica starts, becomes healthy,
starts draining or exits; operators drain a replica (no new requests, stopped once the engine
has nothing left to do) and start it again.

Each replica is an ``EngineProcess`` (``process``: its command line, environment and weights
check). The set of deployments can change while it runs (``update``, from the manifests):
``reconcile.LiveReplicas``, which a ``Supervisor`` is, starts what is new and drains what is
no longer wanted, never restarting a replica that stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from serving.domain.manifest import Deployment
from serving.engines import vllm_metrics
from serving.engines.environment import EngineEnvironment
from serving.engines.process import EngineProcess
from serving.engines.process import WeightsError as WeightsError  # re-exported
from serving.engines.process import verify_weights as verify_weights  # re-exported
from serving.engines.reconcile import LiveReplicas

log = logging.getLogger("enclave.supervisor")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # an engine healthy this long has its backoff reset
STOP_GRACE_S = 15.0  # past the engine's own --shutdown-timeout
_BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
DRAIN_SETTLE_S = 1.0  # gateways have stopped picking a draining replica by then


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # If the supervisor is killed outright, its engines must not linger holding ports and RAM.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setsid()


def state_file(run_dir: Path) -> Path:
    """Where the supervisor publishes its engines' state (the exporter and the CLI read it)."""
    return run_dir / "engines.json"


class Supervisor(LiveReplicas):
    """Every local replica, kept alive; drained and stopped on request; the set follows the
    manifests (``update``: ``reconcile.LiveReplicas``)."""

    def __init__(self, deployments: list[Deployment], env: EngineEnvironment,
                 resolve_dir: Callable[[Deployment], Path], run_dir: Path,
                 host: str = "127.0.0.1") -> None:
        self.env = env
        self.run_dir = run_dir
        self.host = host
        self._resolve_dir = resolve_dir
        self.engines: list[EngineProcess] = []
        for dep in deployments:
            model_dir = resolve_dir(dep)
            for index, port, devices in dep.version.engine.local_replicas():
                self.engines.append(self._engine(dep, index, port, devices, model_dir))
        self._at_start = list(self.engines)  # what ``wait_healthy`` waits for
        self._stopping = asyncio.Event()
        self._started = False
        self._tasks: dict[EngineProcess, asyncio.Task[None]] = {}  # each one's keep-alive
        self._listeners: set[Callable[[dict[str, object]], None]] = set()
        super().__init__()

    def _engine(self, dep: Deployment, index: int, port: int, devices: str | None,
                model_dir: Path) -> EngineProcess:
        name = dep.replica_name(index).replace("/", "-")
        return EngineProcess(dep, index, port, devices, model_dir, self.host,
                             self.run_dir / "logs" / f"{name}.log")

    @property
    def state_file(self) -> Path:
        return state_file(self.run_dir)

    def replica(self, name: str) -> EngineProcess | None:
        return next((e for e in self.engines if e.name == name), None)

    def snapshot(self) -> list[dict[str, object]]:
        return [e.status() for e in self.engines]

    def subscribe(self, listener: Callable[[dict[str, object]], None]) -> Callable[[], None]:
        """``listener`` gets each replica's status whenever it changes; returns the
        unsubscribe function."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def verify(self) -> None:
        for engine in self.engines:
            verify_weights(engine.model_dir, engine.deployment.version.sha256)

    async def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._write_state()
        self._started = True
        self._at_start = list(self.engines)
        self._tasks = {e: self._spawn(e) for e in self.engines}

    def _spawn(self, engine: EngineProcess) -> asyncio.Task[None]:
        return asyncio.create_task(self._keep_alive(engine), name=f"engine-{engine.name}")

    async def wait_healthy(self, timeout_s: float) -> bool:
        """Every replica there at start (and still wanted) is healthy, the held ones aside;
        one added later is not waited for."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(e.state == "healthy" for e in self._at_start
                   if not e.held and e in self.engines):
                return True
            await asyncio.sleep(0.5)
        return False

    async def stop(self) -> None:
        """Stop every replica: gateways are told first (no new requests), then each engine
        gets SIGTERM and its --shutdown-timeout to finish what it has."""
        self._stopping.set()
        for task in list(self._retiring.values()):  # their engines are stopped below
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for engine in self.engines:
            if engine.state == "healthy":
                self._set(engine, "draining")
        await asyncio.gather(*(self._terminate(e) for e in self.engines))
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._write_state()

    async def drain(self, name: str, deadline_s: float) -> dict[str, object]:
        """Take a replica out of service without failing a request: gateways stop sending it
        new ones at once (the ``draining`` event), the supervisor waits until the engine
        reports nothing running or waiting (or ``deadline_s`` passes), then stops it (SIGTERM;
        the engine's --shutdown-timeout covers a request that arrived in the last moment).
        The replica stays stopped (``held``) until ``resume``."""
        engine = self.replica(name)
        if engine is None:
            raise LookupError(name)
        started = time.monotonic()
        serving = engine.state == "healthy"  # else it has no request to finish
        engine.held = True
        engine.resume.clear()
        self._set(engine, "draining")
        log.info("replica draining", extra={"engine": name, "deadline_s": deadline_s})
        idle = await self._until_idle(engine, started + deadline_s) if serving else True
        await self._terminate(engine, final_state="held")
        waited = round(time.monotonic() - started, 3)
        log.info("replica drained and stopped", extra={
            "engine": name, "waited_s": waited, "idle": idle})
        return {"replica": name, "state": engine.state, "idle_at_stop": idle,
                "waited_s": waited}

    def resume(self, name: str) -> dict[str, object]:
        engine = self.replica(name)
        if engine is None:
            raise LookupError(name)
        if engine.held and engine not in self._retiring:  # a retiring one stays stopped
            engine.held = False
            engine.resume.set()
            self._set(engine, "starting")
            log.info("replica started again", extra={"engine": name})
        return engine.status()

    async def _until_idle(self, engine: EngineProcess, deadline: float) -> bool:
        """Until the engine has no request running or waiting, by its own metrics, twice in
        a row (a request a gateway picked just before the event may still be on its way)."""
        await asyncio.sleep(DRAIN_SETTLE_S)
        quiet = 0
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                if engine.proc is None or engine.proc.returncode is not None:
                    return True
                busy = await _engine_busy(client, engine.url)
                quiet = quiet + 1 if busy == 0 else 0
                if quiet >= 2:
                    return True
                await asyncio.sleep(0.5)
        return False

    def _set(self, engine: EngineProcess, state: str) -> None:
        engine.state = state
        self._write_state()
        status = engine.status()
        for listener in list(self._listeners):
            listener(status)

    async def _keep_alive(self, engine: EngineProcess) -> None:
        backoff = BACKOFF_START_S
        async with httpx.AsyncClient(trust_env=False) as client:
            while not self._stopping.is_set():
                if engine.held:
                    await engine.resume.wait()
                    continue
                started = time.monotonic()
                reason = await self._run_once(engine, client)
                if self._stopping.is_set():
                    return
                if engine.held:  # drained and stopped on purpose: not a failure
                    self._set(engine, "held")
                    backoff = BACKOFF_START_S
                    continue
                if time.monotonic() - started > STABLE_AFTER_S:
                    backoff = BACKOFF_START_S
                engine.restarts += 1
                engine.last_exit = reason
                self._set(engine, "backoff")
                log.warning("engine stopped; restarting", extra={
                    "engine": engine.name, "reason": reason, "restart_in_s": backoff,
                    "restarts": engine.restarts, "log_file": str(engine.log_path)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self, engine: EngineProcess, client: httpx.AsyncClient) -> str:
        """Start the engine and return why it stopped being useful."""
        env = engine.environment(self.env.gpu)
        with engine.log_path.open("ab") as logf:
            engine.proc = await asyncio.create_subprocess_exec(
                *engine.command(self.env.python), stdin=asyncio.subprocess.DEVNULL,
                stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env, cwd=self.run_dir,
                preexec_fn=_die_with_parent)
        engine.pid = engine.proc.pid
        self._set(engine, "starting")
        log.info("engine starting", extra={"engine": engine.name, "pid": engine.pid,
                                            "port": engine.port, "devices": engine.devices})
        limit_s = engine.deployment.version.engine.startup_timeout_s
        exited = asyncio.create_task(engine.proc.wait())
        try:
            if not await self._until_healthy(engine, client, exited, limit_s):
                if exited.done():
                    return f"{describe_exit(exited.result())} during start-up"
                return f"not healthy after {limit_s:.0f} s"
            if engine.held:  # drained while it started
                return "drained"
            self._set(engine, "healthy")
            log.info("engine healthy", extra={"engine": engine.name, "pid": engine.pid})
            return await self._until_dead(engine, client, exited)
        finally:
            await self._kill_group(engine, exited)
            if not self._stopping.is_set() and not engine.held:
                self._set(engine, "exited")  # gateways stop sending to it now

    async def _until_healthy(self, engine: EngineProcess, client: httpx.AsyncClient,
                             exited: asyncio.Task[int], limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and not exited.done():
            if await _healthy(client, engine.url):
                return True
            await asyncio.wait({exited}, timeout=0.5)
        return False

    async def _until_dead(self, engine: EngineProcess, client: httpx.AsyncClient,
                          exited: asyncio.Task[int]) -> str:
        failures = 0
        while True:
            await asyncio.wait({exited}, timeout=2.0)
            if exited.done():
                return describe_exit(exited.result())
            if engine.terminating:  # finishing its requests (--shutdown-timeout): let it
                await exited
                return describe_exit(exited.result())
            if await _healthy(client, engine.url, limit_s=5.0):
                failures = 0
                continue
            failures += 1
            if failures >= 3:
                return "stopped answering /health (3 checks in a row)"

    async def _terminate(self, engine: EngineProcess, final_state: str = "stopped") -> None:
        proc = engine.proc
        if proc is None or proc.returncode is not None:
            self._set(engine, final_state)
            return
        grace = STOP_GRACE_S
        if engine.state in ("healthy", "draining"):  # it may have requests to finish
            grace += engine.deployment.version.engine.shutdown_timeout_s
        engine.terminating = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            log.warning("engine ignored SIGTERM; killing", extra={"engine": engine.name})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        engine.terminating = False
        self._set(engine, final_state)
        log.info("engine stopped", extra={"engine": engine.name})

    async def _kill_group(self, engine: EngineProcess, exited: asyncio.Task[int]) -> None:
        """Leave no worker of a failed engine behind (they hold the port and memory)."""
        proc = engine.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.CancelledError):
            await exited
        engine.pid = None

    def _write_state(self) -> None:
        state = {e.name: {**e.status()} for e in self.engines}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)


async def _engine_busy(client: httpx.AsyncClient, url: str) -> float | None:
    """Requests the engine has running or waiting, from its /metrics; None when it cannot say."""
    try:
        resp = await client.get(f"{url}/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    found = vllm_metrics.samples(resp.content, _BUSY)
    return sum(sum(values) for values in found.values())


async def _healthy(client: httpx.AsyncClient, url: str, limit_s: float = 2.0) -> bool:
    try:
        resp = await client.get(f"{url}/health", timeout=limit_s)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200
