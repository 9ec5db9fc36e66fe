"""`enclave policies`, `enclave usage`, `enclave oauth`, `enclave db`: operating the state."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import click
from rich.table import Table

from serving.cli.common import (
    Store,
    console,
    fail,
    known_models,
    load_settings,
    stdout,
    with_store,
)
from serving.domain.policy import PolicyError
from serving.storage import migrate
from serving.storage.db import create_engine
from serving.storage.policies import load_policies


@click.group()
def policies() -> None:
    """Check and show client policies."""


@policies.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path))
def check(file: Path | None) -> None:
    """Validate a policy file (default: the configured one) before deploying it."""
    settings = load_settings()
    path = file or settings.policies_file
    try:
        parsed = load_policies(path, known_models(settings))
    except PolicyError as exc:
        fail(str(exc))
    console.print(f"{path}: version {parsed.version}, policies: "
                  f"{', '.join(sorted(parsed.policies))} — valid")


@policies.command("show")
def show() -> None:
    """The policies in the configured file."""
    settings = load_settings()
    try:
        parsed = load_policies(settings.policies_file, known_models(settings))
    except PolicyError as exc:
        fail(str(exc))
    table = Table("policy", "scopes", "models", "caps", "limits", "budgets",
                  title=f"{settings.policies_file} (version {parsed.version})")
    for name, p in sorted(parsed.policies.items()):
        def fmt(obj: object) -> str:
            return ", ".join(f"{k}={v}" for k, v in obj.model_dump().items()  # type: ignore[attr-defined]
                             if v is not None) or "-"
        table.add_row(name, " ".join(p.scopes), " ".join(p.models) or "-", fmt(p.caps),
                      fmt(p.limits), fmt(p.budgets))
    stdout.print(table)


@click.command()
@click.option("--client", "client_id", help="Only this client.")
@click.option("--from", "since", help="First day, YYYY-MM-DD.")
@click.option("--to", "until", help="Last day, YYYY-MM-DD.")
def usage(client_id: str | None, since: str | None, until: str | None) -> None:
    """Token usage per client, model and day."""
    for label, value in (("--from", since), ("--to", until)):
        if value is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            fail(f"{label} must be a day, YYYY-MM-DD")
    rows = with_store(load_settings(), lambda s: s.ledger.usage(client_id, since, until))
    table = Table("day", "client", "model", "requests", "prompt", "completion", "total")
    for r in rows:
        table.add_row(str(r["day"]), str(r["client"]), str(r["model"]), f"{r['requests']:,}",
                      f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}",
                      f"{r['total_tokens']:,}")
    stdout.print(table)


@click.group()
def oauth() -> None:
    """Token signing keys for the client-credentials grant."""


@oauth.command("rotate-key")
def rotate_key() -> None:
    """Make a new signing key current. Tokens signed by the old one stay valid until they
    expire; gateways pick the new key up within 30 s."""

    async def go(store: Store) -> str:
        await store.issuer.refresh()
        return await store.issuer.rotate()

    kid = with_store(load_settings(), go)
    console.print(f"new signing key {kid} is current")


@click.group()
def db() -> None:
    """The state database's schema (Alembic migrations)."""


@db.command("upgrade")
def upgrade() -> None:
    """Migrate the state database to the current schema (gateways also do it at start)."""
    settings = load_settings()

    async def go() -> tuple[str | None, str]:
        engine = create_engine(settings.resolved_database_url)
        try:
            return await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    before, now = asyncio.run(go())
    console.print(f"schema at revision {now}" + (f" (was {before})" if before != now else
                                                 " (already current)"))
