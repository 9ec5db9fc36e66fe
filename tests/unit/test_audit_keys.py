"""The audit trail's keys: content encryption that fails closed and says why, key files that
must stay private, and the checkpoint signing key with its public half."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from serving.storage.audit_crypto import (
    AuditKeyError,
    ContentKeyring,
    KeyProvider,
    create_content_key,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
)

SECRET = b"patient 4711 has condition X"


def _key_file(directory: Path, key_id: str, key: bytes, mode: int = 0o600) -> Path:
    directory.mkdir(exist_ok=True, mode=0o700)
    path = directory / f"{key_id}.key"
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(mode)
    return path


def test_content_round_trips_and_the_blob_names_its_key(tmp_path: Path) -> None:
    key_id = create_content_key(tmp_path)
    ring = ContentKeyring(tmp_path, None)
    blob = ring.encrypt(SECRET, b"req-1")
    assert blob["alg"] == "AES-256-GCM" and blob["key_id"] == key_id
    assert len(base64.b64decode(blob["nonce"])) == 12
    assert SECRET not in json.dumps(blob).encode()
    assert ring.encrypt(SECRET, b"req-1")["nonce"] != blob["nonce"]
    assert ring.decrypt(blob, b"req-1") == SECRET


@pytest.mark.parametrize("tamper", ["wrong aad", "tampered ciphertext", "another key"])
def test_content_that_does_not_authenticate_is_refused_without_leaking(
        tmp_path: Path, tamper: str) -> None:
    key = os.urandom(32)
    key_file = _key_file(tmp_path / "a", "k1", key)
    ring = ContentKeyring(tmp_path / "a", None)
    blob, aad = ring.encrypt(SECRET, b"req-1"), b"req-1"
    if tamper == "wrong aad":
        aad = b"req-2"  # another record's content pasted in
    elif tamper == "tampered ciphertext":
        ct = bytearray(base64.b64decode(blob["ct"]))
        ct[0] ^= 1
        blob["ct"] = base64.b64encode(bytes(ct)).decode()
    else:
        _key_file(tmp_path / "b", "k1", os.urandom(32))
        ring = ContentKeyring(tmp_path / "b", None)
    with pytest.raises(AuditKeyError, match="fails authentication") as caught:
        ring.decrypt(blob, aad)
    message = str(caught.value)
    assert "patient" not in message and key_file.read_text().strip() not in message


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    create_content_key(tmp_path)
    ring = ContentKeyring(tmp_path, None)
    blob = {**ring.encrypt(SECRET, b"r"), "key_id": "k20250101-abcdef"}
    with pytest.raises(AuditKeyError, match="k20250101-abcdef"):
        ring.decrypt(blob, b"r")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, "k1", os.urandom(32), mode)
    with pytest.raises(AuditKeyError, match=re.escape(f"chmod 600 {path}")):
        ContentKeyring(tmp_path, None)


def test_a_key_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    _key_file(tmp_path, "k1", os.urandom(16))
    with pytest.raises(AuditKeyError, match="256-bit"):
        ContentKeyring(tmp_path, None)


def test_the_newest_key_is_current_unless_one_is_named(tmp_path: Path) -> None:
    for name, mtime in (("k-old", 1000), ("k-new-a", 2000), ("k-new-b", 2000)):
        os.utime(_key_file(tmp_path, name, os.urandom(32)), (mtime, mtime))
    assert ContentKeyring(tmp_path, None).current_id == "k-new-b"  # ties: by name
    old = ContentKeyring(tmp_path, "k-old")
    assert old.current_id == "k-old" and old.encrypt(SECRET, b"r")["key_id"] == "k-old"
    with pytest.raises(AuditKeyError, match="k-missing"):
        ContentKeyring(tmp_path, "k-missing")


def test_without_keys_encryption_says_how_to_make_one(tmp_path: Path) -> None:
    ring = ContentKeyring(tmp_path / "none", None)
    assert not ring.has_key
    with pytest.raises(AuditKeyError, match="enclave audit keygen"):
        ring.encrypt(SECRET, b"r")


def test_keygen_makes_private_keys_that_become_current(tmp_path: Path) -> None:
    keys = tmp_path / "audit-keys"
    first = create_content_key(keys)
    second = create_content_key(keys)
    assert first != second
    assert all(re.fullmatch(r"k\d{8}-[0-9a-f]{6}", k) for k in (first, second))
    assert keys.stat().st_mode & 0o777 == 0o700
    assert (keys / f"{second}.key").stat().st_mode & 0o777 == 0o600
    os.utime(keys / f"{first}.key", (1000, 1000))
    ring = ContentKeyring(keys, None)
    assert ring.has_key and ring.current_id == second
    provider: KeyProvider = ring  # the seam a KMS-backed provider would fill
    assert len(provider.get(first)) == 32


def test_the_signing_key_is_created_private_with_a_public_half(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    key = load_or_create_signing_key(path)
    pub = public_key_path(path)
    assert path.stat().st_mode & 0o777 == 0o600 and pub.stat().st_mode & 0o777 == 0o644
    assert b"PRIVATE" not in pub.read_bytes()
    again = load_or_create_signing_key(path)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert again.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    signature = key.sign(b"checkpoint")
    load_public_key(pub).verify(signature, b"checkpoint")
    load_public_key(path).verify(signature, b"checkpoint")  # the private file works too


def test_the_public_half_is_rewritten_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    key = load_or_create_signing_key(path)
    public_key_path(path).unlink()
    load_or_create_signing_key(path)
    load_public_key(public_key_path(path)).verify(key.sign(b"x"), b"x")


def test_a_signing_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        load_or_create_signing_key(path)


def test_a_file_without_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-key.pub"
    path.write_text("hello\n")
    with pytest.raises(AuditKeyError, match="no Ed25519 key"):
        load_public_key(path)
