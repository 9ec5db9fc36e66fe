"""Fixtures. The real vLLM engines start once per session (``engines``); gateways are cheap and
start per test or per module with the settings a test needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serving.bench.stores import PostgresServer, RedisServer
from tests.support import (
    Engines,
    GatewayServer,
    gateway_settings,
    new_key,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that kill an engine run last, so the others never wait for a restart.
    items.sort(key=lambda item: 1 if item.get_closest_marker("engine_restart") else 0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine_restart: kills an engine; runs last")


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, as the gateway does."""
    return "asyncio"


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    cluster = Engines(tmp_path_factory.mktemp("engines"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def gateway(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    settings = gateway_settings(tmp_path_factory.mktemp("gateway"), engines.models_dir,
                                supervisor_socket=engines.socket)
    gw = GatewayServer(settings).start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def api_key(gateway: GatewayServer) -> str:
    return new_key(gateway.settings, "tests")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
