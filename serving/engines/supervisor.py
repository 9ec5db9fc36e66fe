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

The set of deployments can change while it runs (``update``, from the manifests): a new
replica starts (its weights verified first) without touching the others; one no longer wanted
is drained like ``drain`` and then leaves for good; a change to a running replica's command
line or environment waits for a restart (it is logged, never applied by restarting it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving.domain.manifest import FORBIDDEN_ENGINE_ENV, Deployment
from serving.engines import vllm_metrics
from serving.engines.environment import EngineEnvironment

log = logging.getLogger("enclave.supervisor")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # an engine healthy this long has its backoff reset
STOP_GRACE_S = 15.0  # past the engine's own --shutdown-timeout
_BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
DRAIN_SETTLE_S = 1.0  # gateways have stopped picking a draining replica by then
# Environment for every engine: offline, and no usage statistics sent anywhere.
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "PYTHONUNBUFFERED": "1",
}
# On CPU hosts: vLLM's default pins every engine's compute thread to the same core and reserves
# the other for "everything else"; with two engines on a small host that starves the API
# servers, and streams arrive in one burst at the end. One unpinned thread per engine streams
# token by token (measured on 2 cores: first of 600 tokens at ~0.1 s instead of 1-3.5 s).
CPU_ENGINE_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


# Never passed to an engine: the gateway's secrets and settings, and the gateway's virtualenv.
_WITHHELD_PREFIXES = ("ENCLAVE_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")


def engine_environment(extra: dict[str, str], gpu: bool = False) -> dict[str, str]:
    # Nor what would open an engine's development endpoints, whoever's shell set it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_WITHHELD_PREFIXES) and k not in FORBIDDEN_ENGINE_ENV}
    return {**env, **ENGINE_ENV, **({} if gpu else CPU_ENGINE_ENV), **extra}


class WeightsError(RuntimeError):
    """Weights missing or not matching their pinned checksum."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def verify_weights(directory: Path, sha256: dict[str, str]) -> None:
    if not directory.is_dir():
        raise WeightsError(f"model directory {directory} does not exist")
    for name, expected in sorted(sha256.items()):
        path = directory / name
        if not path.is_file():
            raise WeightsError(f"{path} is missing")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise WeightsError(f"{path}: sha256 {digest.hexdigest()} does not match the "
                               f"manifest's {expected}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # If the supervisor is killed outright, its engines must not linger holding ports and RAM.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setsid()


@dataclass(eq=False)
class EngineProcess:
    """One local replica of a deployment."""

    deployment: Deployment
    index: int
    port: int
    devices: str | None
    model_dir: Path
    host: str
    log_path: Path
    # starting | healthy | draining | backoff | held (drained, stopped until started) | stopped
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    held: bool = False
    terminating: bool = False  # SIGTERM sent: the engine is finishing its requests
    resume: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        return self.deployment.replica_name(self.index)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, python: Path) -> list[str]:
        engine = self.deployment.version.engine
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.deployment.model,
            "--host", self.host, "--port", str(self.port),
            "--max-model-len", str(engine.max_model_len),
            "--shutdown-timeout", str(engine.shutdown_timeout_s),
            *engine.args,
        ]

    def environment(self, gpu: bool) -> dict[str, str]:
        extra = dict(self.deployment.version.engine.env)
        if self.devices is not None:
            extra["CUDA_VISIBLE_DEVICES"] = self.devices
        return engine_environment(extra, gpu=gpu)

    def status(self) -> dict[str, object]:
        return {"replica": self.name, "deployment": self.deployment.name,
                "model": self.deployment.model, "version": self.deployment.version.name,
                "pid": self.pid, "port": self.port, "url": self.url, "devices": self.devices,
                "state": self.state, "restarts": self.restarts, "last_exit": self.last_exit}


def state_file(run_dir: Path) -> Path:
    """Where the supervisor publishes its engines' state (the exporter and the CLI read it)."""
    return run_dir / "engines.json"


class Supervisor:
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
        self._updating = asyncio.Lock()
        self._wanted: list[Deployment] | None = None  # the set ``update`` was last given
        self._retiring: dict[EngineProcess, asyncio.Task[None]] = {}
        self._pending: dict[str, Deployment] = {}  # changes waiting for a restart (warned)

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

    # -- the deployments, changed while running ---------------------------------------------

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
