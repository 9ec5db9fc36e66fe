"""`enclave keys`: create (shown once), list (never secrets), revoke."""

from __future__ import annotations

import click
from rich.table import Table

from serving.cli.common import console, fail, load_settings, stdout, with_keys
from serving.services.auth import IssuedKey, KeyService
from serving.storage.keys import KeyRecord


@click.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
def create(name: str) -> None:
    """Create a key. It is printed once, on stdout; only its HMAC is stored."""
    settings = load_settings()
    settings.ensure_pepper_file()

    async def go(svc: KeyService) -> IssuedKey:
        try:
            return await svc.issue(name)
        except ValueError as exc:
            fail(str(exc))

    issued = with_keys(settings, go)
    console.print(f"created key [bold]{issued.record.id}[/] for {issued.record.name!r}; "
                  "it is shown once, store it now:")
    click.echo(issued.key)


@keys.command("list")
def list_() -> None:
    """List keys (id, name, dates). Secrets are never shown: they are not stored."""
    records = with_keys(load_settings(), lambda svc: svc.all())
    table = Table("id", "name", "created", "status")
    for r in records:
        status = "active" if r.active else f"revoked {r.revoked_at:%Y-%m-%d %H:%M}"
        table.add_row(r.id, r.name, f"{r.created_at:%Y-%m-%d %H:%M}", status)
    stdout.print(table)


@keys.command("revoke")
@click.argument("key_id_or_name")
def revoke(key_id_or_name: str) -> None:
    """Revoke a key by id, or every active key with that name."""

    async def go(svc: KeyService) -> list[KeyRecord]:
        return await svc.revoke(key_id_or_name)

    revoked = with_keys(load_settings(), go)
    if not revoked:
        fail(f"no active key with id or name {key_id_or_name!r}")
    for r in revoked:
        console.print(f"revoked {r.id} ({r.name}); gateways refuse it within seconds")
