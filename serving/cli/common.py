"""Helpers shared by the CLI commands: settings, console, the state store the gateway uses."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console

from serving.admission.policy_store import PolicyStore
from serving.container import StateServices, state_services
from serving.domain.manifest import ManifestError
from serving.domain.policy import PolicyError
from serving.settings import Settings
from serving.storage import migrate
from serving.storage.db import create_engine
from serving.storage.manifests import load_manifests

console = Console(stderr=True, highlight=False)  # status and errors
# Results; wide when piped, so tables keep whole ids instead of folding them.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(1)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        fail("invalid settings: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))


def known_models(settings: Settings) -> set[str]:
    try:
        return {m.name for m in load_manifests(settings.models_dir)}
    except ManifestError as exc:
        fail(str(exc))


def load_policy_store(settings: Settings) -> PolicyStore:
    try:
        return PolicyStore(settings.policies_file, known_models(settings))
    except PolicyError as exc:
        fail(str(exc))


# The gateway's state, as the CLI sees it: the same services on the same database.
Store = StateServices


def with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``fn`` against the state the gateways use (migrated to the current schema first)."""
    try:
        pepper = settings.load_pepper()
    except ValueError as exc:
        fail(str(exc))
    policies = load_policy_store(settings)

    async def run() -> T:
        db = create_engine(settings.resolved_database_url)
        try:
            await migrate.upgrade(db)
            return await fn(state_services(settings, db, pepper, policies))
        finally:
            await db.dispose()

    return asyncio.run(run())


settings_option = click.option(
    "--dev", "dev_mode", is_flag=True, default=None,
    help="Dev mode: relaxed start-up checks (never in production).")
