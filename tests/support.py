"""Test helpers: free ports, test copies of the manifests, a gateway on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
import yaml

from serving.app import create_app
from serving.logs import JsonFormatter
from serving.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TEST_PEPPER = "test-pepper-" + "0123456789abcdef" * 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def copy_manifests(dest: Path, ports: dict[str, int] | None = None) -> Path:
    """The repository's manifests, with each engine moved to a free port (or the one given)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "models").glob("*.yaml")):
        data = yaml.safe_load(src.read_text())
        for version in data["versions"]:
            version["engine"]["port"] = (ports or {}).get(data["name"]) or free_port()
        (dest / src.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


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
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, lifespan="on", loop="asyncio")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                        daemon=True)

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
