"""Bring the state database to the current schema with Alembic, from the gateway or the CLI.

A database made by the walking platform (``create_all``, no ``alembic_version`` table) is stamped
at revision 0001 first. On PostgreSQL an advisory lock serialises gateways starting together.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_ID = 0x656E636C  # "encl"


def _config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    script = ScriptDirectory(str(MIGRATIONS))
    rev = script.get_current_head()
    assert rev is not None
    return rev


def _upgrade(connection: Connection) -> str | None:
    cfg = _config(connection)
    tables = set(inspect(connection).get_table_names())
    if "api_keys" in tables and "alembic_version" not in tables:
        command.stamp(cfg, "0001")
    before = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(cfg, "head")
    return before


async def upgrade(engine: AsyncEngine) -> tuple[str | None, str]:
    """Migrate to head. Returns (revision before, revision now)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        before = await conn.run_sync(_upgrade)
    return before, head()

