"""Helpers shared by the CLI commands: settings, console, the state store the gateway uses."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console

from serving.services.auth import KeyService
from serving.services.clients import ClientService
from serving.services.policy import PolicyStore
from serving.services.tokens import TokenIssuer
from serving.settings import Settings
from serving.storage import migrate
from serving.storage.clients import ClientRepository
from serving.storage.db import create_engine
from serving.storage.keys import KeyRepository
from serving.storage.ledger import LedgerRepository
from serving.storage.manifests import ManifestError, load_manifests
from serving.storage.policies import PolicyError
from serving.storage.signing import SigningKeyRepository

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


@dataclass(frozen=True)
class Store:
    """The gateway's state, as the CLI sees it: the same services on the same database."""

    settings: Settings
    keys: KeyService
    clients: ClientService
    policies: PolicyStore
    ledger: LedgerRepository
    signing: TokenIssuer


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
            return await fn(Store(
                settings=settings,
                keys=KeyService(KeyRepository(db), pepper, cache_ttl_s=0),
                clients=ClientService(ClientRepository(db), policies, cache_ttl_s=0),
                policies=policies, ledger=LedgerRepository(db),
                signing=TokenIssuer(SigningKeyRepository(db), pepper, settings.oauth_issuer,
                                    settings.oauth_audience, settings.oauth_token_ttl_s)))
        finally:
            await db.dispose()

    return asyncio.run(run())


settings_option = click.option(
    "--dev", "dev_mode", is_flag=True, default=None,
    help="Dev mode: relaxed start-up checks (never in production).")
