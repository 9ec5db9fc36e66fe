"""`enclave clients`: the products and services that own keys and follow a policy."""

from __future__ import annotations

import click
from rich.table import Table

from serving.admission.budgets import BudgetStatus, budget_status
from serving.cli.common import Store, console, fail, load_settings, stdout, with_store
from serving.cli.keys import _expiry, _scopes, issue_key, key_table, show_issued
from serving.domain.policy import Policy
from serving.storage.clients import ClientExists, ClientRecord
from serving.storage.keys import KeyRecord


@click.group()
def clients() -> None:
    """Manage clients (each owns keys and follows one policy)."""


@clients.command("create")
@click.argument("name")
@click.option("--policy", required=True, help="A policy name from the policy file.")
@click.option("--description", default="", help="What the client is.")
def create(name: str, policy: str, description: str) -> None:
    """Create a client."""

    async def go(store: Store) -> ClientRecord:
        try:
            return await store.clients.create(name, policy, description)
        except (ClientExists, ValueError) as exc:
            fail(str(exc))

    record = with_store(load_settings(), go)
    console.print(f"created client [bold]{record.id}[/] (policy {record.policy}); give it a "
                  f"key with `enclave keys create --client {record.id}`")


@clients.command("list")
def list_() -> None:
    """List clients."""
    records = with_store(load_settings(), lambda s: s.clients.all())
    table = Table("name", "policy", "created", "status", "description")
    for c in records:
        table.add_row(c.id, c.policy, f"{c.created_at:%Y-%m-%d}",
                      "active" if c.active else "disabled", c.description)
    stdout.print(table)


@clients.command("show")
@click.argument("name")
def show(name: str) -> None:
    """A client: its policy, budgets used today and this month, and its keys."""

    async def go(store: Store) -> tuple[ClientRecord, list[BudgetStatus], list[KeyRecord],
                                        Policy | None]:
        client = await store.clients.get(name)
        if client is None:
            fail(f"no client named {name!r}")
        policy = store.policies.get(client.policy)
        status = await budget_status(store.ledger, client.id,
                                     policy.budgets if policy else None)
        return client, status, await store.keys.all(client.id), policy

    client, status, keys, policy = with_store(load_settings(), go)
    stdout.print(f"[bold]{client.id}[/]  policy {client.policy}"
                 f"{'' if policy else ' (NOT DEFINED in the policy file)'}  "
                 f"{'active' if client.active else 'disabled'}")
    for b in status:
        label = "today" if b.kind == "day" else "this month"
        stdout.print(f"  tokens {label}: {b.used:,} used, {b.reserved:,} reserved, limit "
                     f"{f'{b.limit:,}' if b.limit else 'none'}")
    stdout.print(key_table(keys))


@clients.command("set")
@click.argument("name")
@click.option("--policy", help="Move the client to another policy.")
@click.option("--description")
@click.option("--disable/--enable", "disabled", default=None,
              help="A disabled client's keys and tokens are refused.")
def set_(name: str, policy: str | None, description: str | None, disabled: bool | None) -> None:
    """Change a client's policy, description, or disable it."""

    async def go(store: Store) -> ClientRecord | None:
        if await store.clients.get(name) is None:
            fail(f"no client named {name!r}")
        try:
            return await store.clients.update(name, policy=policy, description=description,
                                              disabled=disabled)
        except ValueError as exc:
            fail(str(exc))

    record = with_store(load_settings(), go)
    assert record is not None
    console.print(f"client {record.id}: policy {record.policy}, "
                  f"{'active' if record.active else 'disabled'}; gateways apply it within "
                  "seconds")


@clients.command("secret")
@click.argument("name")
@click.option("--scopes", help="Scopes tokens may carry (default: the policy's).")
@click.option("--expires", help="Lifetime, e.g. 90d (default: until revoked).")
def secret(name: str, scopes: str | None, expires: str | None) -> None:
    """Create an OAuth2 client secret (client credentials grant at POST /oauth/token).
    Rotate and revoke it like a key (`enclave keys rotate/revoke ID`)."""
    settings = load_settings()
    wanted, expiry = _scopes(scopes), _expiry(expires)
    issued = with_store(settings, lambda s: issue_key(s, name, wanted, expiry, "", "secret"))
    show_issued(issued, "client secret")
    console.print(f"exchange it: curl -u {name}:SECRET -d grant_type=client_credentials "
                  f"http://{settings.host}:{settings.port}/oauth/token")
