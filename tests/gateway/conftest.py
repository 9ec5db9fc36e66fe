"""Fixtures the token tests share (each module gets its own gateway: module scope)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.bench.stores import PostgresServer
from tests.support import GatewayServer, engineless_gateway
from tests.support.tokens import client_secret, token_for


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh state database on each backend (the ``postgres`` server is started once)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.new_database()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    yield from engineless_gateway(tmp_path_factory, "gw-tokens")


@pytest.fixture(scope="module")
def app_secret(gw: GatewayServer) -> str:
    return client_secret(gw.settings, "app")


@pytest.fixture(scope="module")
def app_token(gw: GatewayServer, app_secret: str) -> str:
    return token_for(gw, "app", app_secret)
