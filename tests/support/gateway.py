"""Test helpers: free ports, test copies of the manifests, a gateway on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from pydantic import SecretStr

from serving import server
from serving.app import create_app
from serving.bench.targets import free_port
from serving.logs import JsonFormatter
from serving.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent
TEST_PEPPER = "test-pepper-" + "0123456789abcdef" * 3


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The response has this status and an OpenAI-shaped error; returns the error object."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def copy_manifests(dest: Path, ports: dict[str, int] | None = None,
                   replicas: dict[str, int] | None = None) -> Path:
    """The repository's manifests, with each engine moved to free ports (or the one given),
    and as many local replicas as ``replicas`` says (default the manifest's)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "models").glob("*.yaml")):
        data = yaml.safe_load(src.read_text())
        count = (replicas or {}).get(data["name"])
        for version in data["versions"]:
            if count is not None:
                version["engine"]["replicas"] = count
            n = version["engine"].get("replicas", 1)
            version["engine"]["port"] = (ports or {}).get(data["name"]) or free_ports(n)
        (dest / src.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (replica i of a version listens on port+i)."""
    for _ in range(100):
        first = free_port()
        if n <= 1:
            return first
        if first + n - 1 > 65535:
            continue
        socks = []
        try:
            for port in range(first + 1, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class LogCapture(logging.Handler):
    """Keeps every line the gateway logs, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def __enter__(self) -> LogCapture:
        logger = logging.getLogger("enclave")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("enclave")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


class GatewayServer:
    """The real app on a real uvicorn server on loopback, in a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = settings.port
        # The production server: the same protocol (receive deadlines) and listeners.
        self.server = uvicorn.Server(server.config(self.app, settings, loop="asyncio"))
        sockets = server.listeners(settings)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=sockets)), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)


@contextlib.contextmanager
def running_gateway(settings: Settings) -> Iterator[GatewayServer]:
    gw = GatewayServer(settings).start()
    try:
        yield gw
    finally:
        gw.stop()


TEST_POLICIES = """
version: 1
policies:
  default:
    models: [demo-chat, minilm-embed]
    scopes: [chat, completions, embeddings, models]
    caps: {max_tokens: 2048, n: 4, messages: 64}
  admin:
    scopes: [admin]
  embed-only:
    models: [minilm-embed]
    scopes: [embeddings, models]
  chat-only:
    models: [demo-chat]
    scopes: [chat, models]
  limited:
    models: ["*"]
    scopes: [chat, completions, models]
    limits: {requests_per_minute: 60, concurrent: 2}
  budgeted:
    models: [demo-chat]
    scopes: [chat, models]
    caps: {max_tokens: 64}
    limits: {concurrent: 100}
    budgets: {tokens_per_day: 4000}
"""


def write_policies(root: Path, text: str = TEST_POLICIES) -> Path:
    path = root / "policies.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class GatewayProcess:
    """`enclave gateway` as its own process (what an operator runs), for tests that need
    several gateways or a kill -9."""

    def __init__(self, settings: Settings, env: dict[str, str], log_path: Path,
                 workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers
        self.port = free_port()
        self.env = {**env, "ENCLAVE_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving.cli.main", "gateway",
                 "--workers", str(self.workers)], env=self.env,
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the gateway did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc, 30)


class RecordingProxy:
    """A TCP relay in front of a real engine that keeps every byte the gateway sent it: what
    the engine was given, exactly (the gateway's manifests point at the proxy's port).

    ``hold()`` holds back the engine's answer to every inference request sent from then on,
    until ``release()``: the request stays in flight at the gateway as long as a test needs,
    without keeping the engine (and the machine's cores) busy meanwhile."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._sent = bytearray()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._holding = False
        self._flowing: asyncio.Event | None = None  # created in the proxy's loop

    def hold(self) -> None:
        self._holding = True
        self._loop.call_soon_threadsafe(self._stopped().clear)

    def release(self) -> None:
        self._holding = False
        self._loop.call_soon_threadsafe(self._stopped().set)

    def _stopped(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

    def start(self) -> RecordingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the recording proxy did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def take(self) -> bytes:
        """Everything sent upstream since the last call."""
        with self._lock:
            data = bytes(self._sent)
            self._sent.clear()
        return data

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        held = False  # this connection carries an inference request sent while holding

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       record: bool) -> None:
            nonlocal held
            try:
                while data := await src.read(65536):
                    if record:
                        with self._lock:
                            self._sent += data
                        if self._holding and data.startswith(b"POST /v1/"):
                            held = True
                    elif held:
                        await self._stopped().wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def gateway_settings(root: Path, models_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": root, "models_dir": models_dir, "port": free_port(),
        "pepper": SecretStr(TEST_PEPPER), "engine_health_interval_s": 0.5,
        "key_cache_ttl_s": 0.5, "policy_reload_interval_s": 0.5,
        "policies_file": write_policies(root),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def engineless_gateway(tmp_path_factory: pytest.TempPathFactory, name: str,
                       **overrides: object) -> Iterator[GatewayServer]:
    """A real gateway whose engines do not run: for a module-scoped fixture to ``yield from``."""
    root = tmp_path_factory.mktemp(name)
    with running_gateway(gateway_settings(root, copy_manifests(root / "models"),
                                          **overrides)) as server:
        yield server


def wait_until(fn: Callable[[], bool], timeout_s: float, step_s: float = 0.25,
               what: str = "") -> float:
    """Poll ``fn`` until it is true; the seconds it took. Fails after ``timeout_s``."""
    start = time.monotonic()
    while not fn():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what or 'not true'}: not within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - start
