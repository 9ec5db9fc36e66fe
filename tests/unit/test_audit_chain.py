"""The audit trail on disk: a chain that verifies, and every kind of tampering named."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serving.storage.audit_chain import AuditLog, AuditLogError, purge, read_records
from serving.storage.audit_crypto import (
    AuditKeyError,
    ContentKeyring,
    create_content_key,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
)
from serving.storage.audit_verify import verify

KEY = Ed25519PrivateKey.generate()


def _trail(directory: Path, n: int, every: int = 4, ts: str = "2026-11-23T10:00:00.000Z",
           **kw: object) -> AuditLog:
    log = AuditLog(directory, KEY, checkpoint_every=every, checkpoint_interval_s=3600,
                   **kw)  # type: ignore[arg-type]
    log.open()
    for i in range(n):
        log.append([{"ts": ts, "request_id": f"r{i + 1}", "client": "c", "status": 200}])
    log.close()
    return log


def _lines(directory: Path) -> tuple[Path, list[str]]:
    (segment,) = sorted(directory.glob("segment-*.jsonl"))
    return segment, segment.read_text().splitlines()


def _kinds(directory: Path) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in verify(directory, KEY.public_key()).problems]


def test_an_untouched_trail_verifies(tmp_path: Path) -> None:
    _trail(tmp_path, 10)
    report = verify(tmp_path, KEY.public_key())
    assert report.ok and report.records == 10 and report.unsigned_tail == 0
    assert [r["request_id"] for r in read_records(tmp_path, client="c")][:2] == ["r1", "r2"]


def test_edit_delete_and_swap_are_each_named(tmp_path: Path) -> None:
    _trail(tmp_path, 20, every=100)
    segment, lines = _lines(tmp_path)
    edited = json.loads(lines[4])
    edited["status"] = 500
    lines[4] = json.dumps(edited)
    lines[11], lines[12] = lines[12], lines[11]
    del lines[8]
    segment.write_text("\n".join(lines) + "\n")
    assert _kinds(tmp_path) == [("edited", 5), ("deleted", 9), ("reordered", 12)]


def test_an_inserted_record_is_named(tmp_path: Path) -> None:
    _trail(tmp_path, 6)
    segment, lines = _lines(tmp_path)
    lines.insert(3, lines[2])
    segment.write_text("\n".join(lines) + "\n")
    assert ("inserted", 3) in _kinds(tmp_path)


def test_rehashing_the_whole_chain_is_caught_by_the_signed_checkpoint(tmp_path: Path) -> None:
    from serving.storage.audit_chain import GENESIS, record_hash
    _trail(tmp_path, 8, every=4)
    segment, lines = _lines(tmp_path)
    records = [json.loads(line) for line in lines]
    records[1]["status"] = 403
    prev = GENESIS
    for r in records:
        r["prev"] = prev
        r["hash"] = prev = record_hash(r)
    segment.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert {k for k, _ in _kinds(tmp_path)} == {"checkpoint_mismatch"}


def test_signed_records_cut_from_the_end_are_caught(tmp_path: Path) -> None:
    _trail(tmp_path, 8, every=4)
    segment, lines = _lines(tmp_path)
    segment.write_text("\n".join(lines[:6]) + "\n")
    assert ("checkpoint_mismatch", 8) in _kinds(tmp_path)


def test_a_torn_last_line_is_cut_and_the_chain_continues(tmp_path: Path) -> None:
    _trail(tmp_path, 5)
    segment, _ = _lines(tmp_path)
    with segment.open("ab") as fh:
        fh.write(b'{"seq": 6, "half')
    log = AuditLog(tmp_path, KEY)
    log.open()
    assert log.recovered_torn_bytes == 16 and log.seq == 5
    log.append([{"ts": "2026-11-23T10:00:00Z", "request_id": "r6"}])
    log.close()
    assert verify(tmp_path, KEY.public_key()).ok


def test_retention_purges_old_segments_and_the_rest_verifies(tmp_path: Path) -> None:
    _trail(tmp_path, 12, every=100, segment_bytes=1 << 16, ts="2020-01-01T00:00:00Z")
    log = AuditLog(tmp_path, KEY, segment_bytes=1 << 16)
    log.open()
    for _ in range(3):  # force segments: each append past the size closes one
        log._segment_bytes = 1
        log.append([{"ts": "2020-01-02T00:00:00Z", "request_id": "old"}])
    log._segment_bytes = 1 << 16
    log.append([{"ts": datetime.now(UTC).isoformat(), "request_id": "new"}])
    log.close()
    before = len(list(tmp_path.glob("segment-*")))
    removed = purge(tmp_path, datetime.now(UTC) - timedelta(days=1))
    assert removed and len(list(tmp_path.glob("segment-*"))) == before - len(removed) >= 1
    report = verify(tmp_path, KEY.public_key())
    assert report.ok and report.first_seq is not None and report.first_seq > 1


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    first = AuditLog(tmp_path, KEY)
    first.open()
    with pytest.raises(AuditLogError, match="another gateway"):
        AuditLog(tmp_path, KEY).open()
    first.close()


def test_content_keys_round_trip_and_refuse_tampering(tmp_path: Path) -> None:
    key_id = create_content_key(tmp_path)
    ring = ContentKeyring(tmp_path)
    assert ring.current_id == key_id
    blob = ring.encrypt(b"secret text", b"req-1")
    assert b"secret" not in json.dumps(blob).encode()
    assert ring.decrypt(blob, b"req-1") == b"secret text"
    with pytest.raises(AuditKeyError, match="authentication"):
        ring.decrypt(blob, b"req-2")
    with pytest.raises(AuditKeyError, match="not in"):
        ring.decrypt({**blob, "key_id": "k-gone"}, b"req-1")
    (tmp_path / f"{key_id}.key").chmod(0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        ContentKeyring(tmp_path)


def test_signing_key_is_private_and_its_public_half_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    public = load_public_key(public_key_path(path))
    public.verify(key.sign(b"x"), b"x")
