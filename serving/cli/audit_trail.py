"""`enclave audit`: verify, read, export and purge the audit trail; make content keys."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from serving.cli.common import console, fail, load_settings, stdout
from serving.durations import parse_duration
from serving.settings import Settings
from serving.storage import audit_chain, audit_verify
from serving.storage.audit_crypto import (
    AuditKeyError,
    ContentKeyring,
    create_content_key,
    load_public_key,
    public_key_path,
)


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.now(UTC) - parse_duration(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{text!r} is neither a duration (1d, 12h) nor an ISO date")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _records(settings: Settings, decrypt: bool, **filters: Any) -> list[dict[str, Any]]:
    keyring = ContentKeyring(settings.resolved_audit_keys_dir, None) if decrypt else None
    out = []
    records = [r for chain in audit_chain.chains(settings.resolved_audit_dir)
               for r in audit_chain.read_records(chain, **filters)]
    records.sort(key=lambda r: str(r.get("ts")))
    for record in records:
        content = record.get("content")
        if isinstance(content, dict) and content.get("mode") == "encrypted":
            if keyring is None:
                record["content"] = {"mode": "encrypted", "key_id": content.get("key_id")}
            else:
                try:
                    plain = keyring.decrypt(content, str(record["request_id"]).encode())
                except AuditKeyError as exc:
                    fail(f"record {record.get('seq')}: {exc}")
                record["content"] = {"mode": "encrypted", "key_id": content.get("key_id"),
                                     **json.loads(plain)}
        out.append(record)
    return out


@click.group()
def audit() -> None:
    """The audit trail: verify it, read it, export it, purge it."""


@audit.command("verify")
@click.option("--public-key", type=click.Path(path_type=Path, exists=True), default=None,
              help="The signing key's public half (default: audit-signing.key.pub).")
def verify(public_key: Path | None) -> None:
    """Check the chain and the signed checkpoints; exit 1 naming every problem."""
    settings = load_settings()
    path = public_key or public_key_path(settings.resolved_audit_signing_key_file)
    if not path.exists():
        fail(f"no public key at {path}: pass --public-key")
    key = load_public_key(path)
    chains = audit_chain.chains(settings.resolved_audit_dir)
    if not chains:
        fail(f"no audit trail under {settings.resolved_audit_dir}")
    problems = 0
    for chain in chains:
        report = audit_verify.verify(chain, key)
        for p in report.problems:
            stdout.print(f"{chain.name}: {p.kind}: {p.detail}")
        problems += len(report.problems)
        stdout.print(f"{chain.name}: {'ok' if report.ok else 'FAILED'}: {report.records} "
                     f"records (seq {report.first_seq}-{report.last_seq}), "
                     f"{report.checkpoints} signed checkpoints, {report.unsigned_tail} records "
                     "after the last checkpoint (chained, not yet signed)")
    if problems:
        fail(f"{problems} problem(s) in the audit trail")


@audit.command("show")
@click.option("--request-id", default=None)
@click.option("--client", default=None)
@click.option("--since", default=None, help="A duration (1d) or an ISO date.")
@click.option("--limit", default=50, show_default=True, help="The most recent N records.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.option("--decrypt", is_flag=True, help="Decrypt content (needs the audit keys).")
def show(request_id: str | None, client: str | None, since: str | None, limit: int,
         as_json: bool, decrypt: bool) -> None:
    """Records, newest last. Encrypted content stays encrypted without --decrypt."""
    settings = load_settings()
    records = _records(settings, decrypt, since=_when(since), client=client,
                       request_id=request_id)[-limit:]
    if as_json:
        for record in records:
            click.echo(json.dumps(record, sort_keys=True))
        return
    table = Table("seq", "time", "client", "endpoint", "model", "status", "tokens", "ms",
                  "decisions", "content")
    for r in records:
        content = r.get("content") or {}
        text = "-"
        if content.get("mode") == "encrypted" and "request" not in content:
            text = f"[encrypted, key {content.get('key_id')}]"
        elif "request" in content:
            text = str(content["request"])[:60]
        tokens = f"{r.get('prompt_tokens') or 0}+{r.get('completion_tokens') or 0}"
        # Record text is data, never rich markup: "[/x]" from a client must print as it is.
        cells = [str(r.get("seq")), str(r.get("ts")), str(r.get("client")),
                 str(r.get("endpoint")), str(r.get("model")), str(r.get("status")), tokens,
                 str(r.get("latency_ms")), json.dumps(r.get("decisions") or {}, sort_keys=True),
                 text]
        table.add_row(*(escape(c) for c in cells))
    stdout.print(table)


@audit.command("export")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True)
@click.option("--since", default=None)
@click.option("--until", default=None)
@click.option("--decrypt", is_flag=True)
def export(out: Path, since: str | None, until: str | None, decrypt: bool) -> None:
    """Write records as JSON lines to a new file (mode 600)."""
    settings = load_settings()
    records = _records(settings, decrypt, since=_when(since), until=_when(until))
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{out} exists already")
    with os.fdopen(fd, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    console.print(f"{len(records)} records written to {out}")


@audit.command("purge")
@click.option("--older-than", required=True, help="e.g. 90d")
def purge(older_than: str) -> None:
    """Remove whole segments older than this; the rest still verifies."""
    settings = load_settings()
    try:
        cutoff = datetime.now(UTC) - parse_duration(older_than)
    except ValueError as exc:
        fail(str(exc))
    removed = [f"{chain.name}/{name}" for chain in audit_chain.chains(settings.resolved_audit_dir)
               for name in audit_chain.purge(chain, cutoff)]
    console.print(f"{len(removed)} segment(s) removed" + (f": {', '.join(removed)}"
                                                          if removed else ""))


@audit.command("keygen")
def keygen() -> None:
    """A new AES-256-GCM content key; it becomes current unless ENCLAVE_AUDIT_KEY_ID is set."""
    settings = load_settings()
    key_id = create_content_key(settings.resolved_audit_keys_dir)
    stdout.print(key_id)
    console.print(f"key {key_id} created in {settings.resolved_audit_keys_dir}; gateways use "
                  "the newest key for new content once restarted (or set ENCLAVE_AUDIT_KEY_ID)")
