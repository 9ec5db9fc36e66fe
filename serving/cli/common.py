"""Helpers shared by the CLI commands: settings, console, the key service."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console

from serving.services.auth import KeyService
from serving.settings import Settings
from serving.storage.db import create_engine, create_schema
from serving.storage.keys import KeyRepository

console = Console(stderr=True, highlight=False)  # status and errors
stdout = Console(highlight=False)  # results
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    sys.exit(1)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        fail("invalid settings: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))


def with_keys(settings: Settings, fn: Callable[[KeyService], Awaitable[T]]) -> T:
    """Run ``fn`` against the key store the gateway uses."""
    try:
        pepper = settings.load_pepper()
    except ValueError as exc:
        fail(str(exc))

    async def run() -> T:
        db = create_engine(settings.resolved_database_url)
        try:
            await create_schema(db)
            return await fn(KeyService(KeyRepository(db), pepper, cache_ttl_s=0))
        finally:
            await db.dispose()

    return asyncio.run(run())


settings_option = click.option(
    "--dev", "dev_mode", is_flag=True, default=None,
    help="Dev mode: relaxed start-up checks (never in production).")
