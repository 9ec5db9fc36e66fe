"""`enclave keys`: create (shown once), list (never secrets), revoke, rotate."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from rich.table import Table

from serving.admission.policy_store import key_scopes
from serving.auth.keys import IssuedKey
from serving.cli.common import Store, console, fail, load_settings, stdout, with_store
from serving.domain.policy import SCOPES
from serving.durations import expiry_after, parse_duration
from serving.storage.keys import KeyRecord


def _expiry(value: str | None) -> datetime | None:
    try:
        return expiry_after(value)
    except ValueError as exc:
        fail(str(exc))


def _scopes(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    scopes = frozenset(s.strip() for s in value.replace(",", " ").split() if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        fail(f"unknown scope(s) {', '.join(sorted(unknown)) or '(none given)'}; "
             f"known: {', '.join(SCOPES)}")
    return scopes


async def issue_key(store: Store, client_id: str, scopes: frozenset[str] | None,
                    expires: datetime | None, name: str, kind: str) -> IssuedKey:
    client = await store.clients.get(client_id)
    if client is None:
        fail(f"no client named {client_id!r}; create it with "
             f"`enclave clients create {client_id} --policy POLICY`")
    policy = store.policies.get(client.policy)
    if policy is None:
        fail(f"the client's policy {client.policy!r} is not in {store.policies.path}")
    try:
        return await store.keys.issue(client.id, key_scopes(client.policy, policy, scopes),
                                      name=name, kind=kind, expires_at=expires)
    except ValueError as exc:
        fail(str(exc))


def show_issued(issued: IssuedKey, what: str = "key") -> None:
    r = issued.record
    expiry = f", expires {r.expires_at:%Y-%m-%d %H:%M} UTC" if r.expires_at else ""
    console.print(f"created {what} [bold]{r.id}[/] for client {r.client_id!r} "
                  f"(scopes: {' '.join(sorted(r.scopes))}{expiry}); "
                  "it is shown once, store it now:")
    click.echo(issued.key)


@click.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--client", "client_id", required=True, help="The client that owns the key.")
@click.option("--scopes", help="Comma-separated: chat, completions, embeddings, models, admin. "
              "Default: everything the client's policy allows.")
@click.option("--expires", help="Lifetime, e.g. 90d, 12h (default: until revoked).")
@click.option("--name", default="", help="A label (default: the client's name).")
def create(client_id: str, scopes: str | None, expires: str | None, name: str) -> None:
    """Create a key. It is printed once, on stdout; only its HMAC is stored."""
    settings = load_settings()
    settings.ensure_pepper_file()
    wanted, expiry = _scopes(scopes), _expiry(expires)
    issued = with_store(settings, lambda s: issue_key(s, client_id, wanted, expiry, name, "api"))
    show_issued(issued)


def key_table(records: list[KeyRecord]) -> Table:
    table = Table("id", "client", "name", "kind", "scopes", "created", "expires", "last used",
                  "status")
    now = datetime.now(UTC)
    for r in records:
        status = ("revoked" if not r.active else "expired" if r.expired(now)
                  else "client disabled" if r.client_disabled else "active")
        table.add_row(r.id, r.client_id or "-", r.name, r.kind, " ".join(sorted(r.scopes)),
                      f"{r.created_at:%Y-%m-%d %H:%M}",
                      f"{r.expires_at:%Y-%m-%d %H:%M}" if r.expires_at else "never",
                      f"{r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "never", status)
    return table


@keys.command("list")
@click.option("--client", "client_id", help="Only this client's keys.")
def list_(client_id: str | None) -> None:
    """List keys (id, client, scopes, dates). Secrets are never shown: they are not stored."""
    records = with_store(load_settings(), lambda s: s.keys.all(client_id))
    stdout.print(key_table(records))


@keys.command("revoke")
@click.argument("key_id_or_name")
def revoke(key_id_or_name: str) -> None:
    """Revoke a key by id, or every active key with that name."""

    async def go(store: Store) -> list[KeyRecord]:
        return await store.keys.revoke(key_id_or_name)

    revoked = with_store(load_settings(), go)
    if not revoked:
        fail(f"no active key with id or name {key_id_or_name!r}")
    for r in revoked:
        console.print(f"revoked {r.id} ({r.name}); gateways refuse it within seconds")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace", default="24h", show_default=True,
              help="How long the old key stays valid ('none': until you revoke it).")
@click.option("--expires", help="Lifetime of the new key (default: the old key's lifetime).")
def rotate(key_id: str, grace: str, expires: str | None) -> None:
    """Replace a key: a new key with the same client and scopes; the old one keeps working
    for the grace period, so callers can switch without an outage."""
    grace_td = None
    if grace.lower() != "none":
        try:
            grace_td = parse_duration(grace)
        except ValueError as exc:
            fail(str(exc))
    expiry = _expiry(expires)

    async def go(store: Store) -> tuple[IssuedKey, KeyRecord]:
        try:
            return await store.keys.rotate(key_id, grace_td, expiry)
        except LookupError as exc:
            fail(str(exc).strip("'\""))

    issued, old = with_store(load_settings(), go)
    until = f"for {grace}" if grace_td is not None else "until you revoke it"
    console.print(f"the old key {old.id} stays valid {until}")
    show_issued(issued)
