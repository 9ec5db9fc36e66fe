"""`enclave audit`: what an operator sees when verifying, reading, exporting, purging the trail
and making content keys. Plaintext shows only when asked for and the key is there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from serving.cli.common import load_settings
from serving.cli.main import cli
from serving.settings import Settings
from serving.storage.audit_chain import AuditLog
from serving.storage.audit_crypto import (
    ContentKeyring,
    create_content_key,
    load_or_create_signing_key,
)

SECRET = "the diagnosis is confidential"


@dataclass
class Trail:
    settings: Settings
    key_id: str
    chain: Path


def _audit(*args: str) -> Result:
    return CliRunner().invoke(cli, ["audit", *args])


def _encrypted(ring: ContentKeyring, request_id: str, text: str) -> dict[str, object]:
    plain = json.dumps({"request": text, "response": "noted"}).encode()
    return {"mode": "encrypted", **ring.encrypt(plain, request_id.encode())}


@pytest.fixture
def trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Trail:
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    key_id = create_content_key(settings.resolved_audit_keys_dir)
    ring = ContentKeyring(settings.resolved_audit_keys_dir, None)
    log = AuditLog(settings.audit_chain_dir,
                   load_or_create_signing_key(settings.resolved_audit_signing_key_file),
                   checkpoint_every=2)
    log.open()
    log.append([
        {"ts": "2020-01-01T00:00:00.000Z", "request_id": "r1", "client": "alice",
         "status": 200, "content": _encrypted(ring, "r1", SECRET)},
        {"ts": "2020-01-02T00:00:00.000Z", "request_id": "r2", "client": "bob",
         "status": 200, "content": {"mode": "redacted", "request": "call <PHONE>",
                                    "response": "ok"}},
    ])
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    log.append([{"ts": now, "request_id": "r3", "client": "alice", "status": 403,
                 "content": _encrypted(ring, "r3", SECRET)}])
    log.close()
    return Trail(settings, key_id, settings.audit_chain_dir)


def test_verify_passes_an_untouched_trail_with_a_summary(trail: Trail) -> None:
    result = _audit("verify")
    assert result.exit_code == 0, result.output
    assert "ok: 3 records (seq 1-3)" in result.stdout and "signed checkpoints" in result.stdout


def test_verify_fails_naming_every_problem(trail: Trail) -> None:
    (segment,) = trail.chain.glob("segment-*.jsonl")
    lines = segment.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["status"] = 500
    segment.write_text(json.dumps(edited) + "\n" + lines[2] + "\n")
    result = _audit("verify")
    assert result.exit_code == 1
    assert "edited: record 1" in result.stdout and "deleted: record 2" in result.stdout
    assert "FAILED" in result.stdout and "2 problem(s)" in result.stderr


def test_verify_with_another_public_key_fails(trail: Trail, tmp_path: Path) -> None:
    load_or_create_signing_key(tmp_path / "other.key")
    result = _audit("verify", "--public-key", str(tmp_path / "other.key.pub"))
    assert result.exit_code == 1 and "bad_signature" in result.stdout


def test_verify_without_a_trail_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    load_or_create_signing_key(tmp_path / "audit-signing.key")
    result = _audit("verify")
    assert result.exit_code == 1 and "no audit trail" in result.stderr


def test_show_never_prints_plaintext_without_decrypt(trail: Trail) -> None:
    table = _audit("show")
    lines = _audit("show", "--json")
    assert table.exit_code == 0 and lines.exit_code == 0
    assert SECRET not in table.output and SECRET not in lines.output
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3"]
    assert records[0]["content"] == {"mode": "encrypted", "key_id": trail.key_id}
    assert records[1]["content"]["request"] == "call <PHONE>"


def test_show_table_marks_encrypted_content_with_its_key(trail: Trail) -> None:
    result = _audit("show", "--request-id", "r1")
    assert f"[encrypted, key {trail.key_id}]" in result.stdout


def test_show_table_prints_brackets_from_a_record_as_they_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    log = AuditLog(settings.audit_chain_dir,
                   load_or_create_signing_key(settings.resolved_audit_signing_key_file))
    log.open()
    log.append([{"ts": "2026-11-23T10:00:00.000Z", "request_id": "r1", "client": "c",
                 "content": {"mode": "redacted", "request": "see [/x] and [bold]",
                             "response": ""}}])
    log.close()
    result = _audit("show")
    assert result.exit_code == 0 and "see [/x] and [bold]" in result.stdout


def test_show_decrypts_when_asked_and_the_key_is_there(trail: Trail) -> None:
    table = _audit("show", "--client", "alice", "--decrypt")
    assert table.exit_code == 0 and SECRET in table.stdout
    lines = _audit("show", "--request-id", "r3", "--json", "--decrypt")
    (record,) = [json.loads(line) for line in lines.stdout.splitlines()]
    assert record["content"]["request"] == SECRET


def test_show_decrypt_without_the_key_fails_naming_it(trail: Trail) -> None:
    (trail.settings.resolved_audit_keys_dir / f"{trail.key_id}.key").unlink()
    result = _audit("show", "--decrypt")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert trail.key_id in result.stderr and SECRET not in result.output


def test_show_filters_and_limits(trail: Trail) -> None:
    def ids(*args: str) -> list[str]:
        result = _audit("show", "--json", *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["request_id"] for line in result.stdout.splitlines()]

    assert ids("--client", "alice") == ["r1", "r3"]
    assert ids("--since", "1d") == ["r3"]
    assert ids("--since", "2020-01-02") == ["r2", "r3"]
    assert ids("--limit", "2") == ["r2", "r3"]
    assert _audit("show", "--since", "yesterday").exit_code == 1


def test_export_writes_a_private_file_and_decrypts_only_when_asked(
        trail: Trail, tmp_path: Path) -> None:
    plain_out, sealed_out = tmp_path / "plain.jsonl", tmp_path / "sealed.jsonl"
    assert _audit("export", "--out", str(sealed_out)).exit_code == 0
    assert _audit("export", "--out", str(plain_out), "--decrypt").exit_code == 0
    for out in (plain_out, sealed_out):
        assert out.stat().st_mode & 0o777 == 0o600
    assert len(sealed_out.read_text().splitlines()) == 3
    assert SECRET not in sealed_out.read_text() and SECRET in plain_out.read_text()
    since = tmp_path / "since.jsonl"
    assert _audit("export", "--out", str(since), "--since", "2020-01-02",
                  "--until", "1d").exit_code == 0
    assert [json.loads(line)["request_id"] for line in since.read_text().splitlines()] == ["r2"]
    again = _audit("export", "--out", str(sealed_out))
    assert again.exit_code == 1 and "exists" in again.stderr


def test_purge_removes_old_segments_and_the_trail_still_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    log = AuditLog(settings.audit_chain_dir,
                   load_or_create_signing_key(settings.resolved_audit_signing_key_file),
                   segment_bytes=1)  # every batch closes its segment
    log.open()
    for i in range(3):
        log.append([{"ts": "2020-01-01T00:00:00.000Z", "request_id": f"old{i}"}])
    log.append([{"ts": datetime.now(UTC).isoformat(), "request_id": "new"}])
    log.close()
    result = _audit("purge", "--older-than", "90d")
    assert result.exit_code == 0 and "3 segment(s) removed" in result.stderr
    assert len(list(settings.audit_chain_dir.glob("segment-*"))) == 1
    assert _audit("verify").exit_code == 0
    bad = _audit("purge", "--older-than", "ninety days")
    assert bad.exit_code == 1 and "not a duration" in bad.stderr


def test_keygen_creates_a_current_key_and_says_how(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    result = _audit("keygen")
    assert result.exit_code == 0
    key_id = result.stdout.strip()
    keys_dir = load_settings().resolved_audit_keys_dir
    assert (keys_dir / f"{key_id}.key").stat().st_mode & 0o777 == 0o600
    assert "ENCLAVE_AUDIT_KEY_ID" in result.stderr
    assert ContentKeyring(keys_dir, None).current_id == key_id
