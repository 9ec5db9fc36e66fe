"""Keys of the audit trail: AES-256-GCM keys that encrypt record content, and the Ed25519 key
that signs checkpoints.

Content keys are files ``<key_id>.key`` (base64 of 32 random bytes, mode 0600) in one
directory; the key id is recorded with every ciphertext so keys can rotate and old records stay
readable. ``KeyProvider`` is the seam where a KMS-style provider would plug in; the directory is
its one implementation here. Never writes key material or plaintext into a message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALG = "AES-256-GCM"


class AuditKeyError(ValueError):
    """A key that is missing, unsafe or wrong; the message says which and how to fix it."""


class KeyProvider(Protocol):
    @property
    def current_id(self) -> str: ...

    def get(self, key_id: str) -> bytes: ...


def _check_private(path: Path) -> None:
    if path.stat().st_mode & 0o077:
        raise AuditKeyError(f"{path} is readable by other users; run `chmod 600 {path}`")


class ContentKeyring:
    """The directory of content keys. ``current_id``: the key that encrypts new content
    (default: the newest file)."""

    def __init__(self, directory: Path, current_id: str | None = None) -> None:
        self.directory = directory
        self._keys: dict[str, bytes] = {}
        newest: tuple[float, str] | None = None
        for path in sorted(directory.glob("*.key")) if directory.is_dir() else []:
            key_id = path.stem
            if not KEY_ID_RE.match(key_id):
                continue
            _check_private(path)
            try:
                key = base64.b64decode(path.read_text().strip(), validate=True)
            except (binascii.Error, ValueError):
                raise AuditKeyError(f"{path} is not a base64 key") from None
            if len(key) != 32:
                raise AuditKeyError(f"{path} is not a 256-bit key")
            self._keys[key_id] = key
            stamp = (path.stat().st_mtime, key_id)
            newest = stamp if newest is None or stamp > newest else newest
        if current_id is not None and current_id not in self._keys:
            raise AuditKeyError(f"the audit key {current_id} is not in {directory}")
        self._current = current_id or (newest[1] if newest else None)

    @property
    def has_key(self) -> bool:
        return self._current is not None

    @property
    def current_id(self) -> str:
        if self._current is None:
            raise AuditKeyError(f"no audit content key in {self.directory}; create one with "
                                "`enclave audit keygen`")
        return self._current

    def get(self, key_id: str) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            raise AuditKeyError(f"the audit key {key_id} is not in {self.directory}")
        return key

    def encrypt(self, plaintext: bytes, aad: bytes) -> dict[str, Any]:
        key_id = self.current_id
        nonce = os.urandom(12)
        ct = AESGCM(self.get(key_id)).encrypt(nonce, plaintext, aad)
        return {"alg": ALG, "key_id": key_id, "nonce": base64.b64encode(nonce).decode(),
                "ct": base64.b64encode(ct).decode()}

    def decrypt(self, blob: dict[str, Any], aad: bytes) -> bytes:
        key = self.get(str(blob.get("key_id")))
        try:
            return AESGCM(key).decrypt(base64.b64decode(blob["nonce"]),
                                       base64.b64decode(blob["ct"]), aad)
        except (InvalidTag, KeyError, binascii.Error, ValueError):
            raise AuditKeyError("the content fails authentication (edited, or another "
                                "record's)") from None


def create_content_key(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_id = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    fd = os.open(directory / f"{key_id}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return key_id


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        _check_private(path)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditKeyError(f"{path} is not an Ed25519 key")
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    pub = public_key_path(path)
    if not pub.exists():
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        pub.chmod(0o644)
    return key


def public_key_path(signing_key_file: Path) -> Path:
    return signing_key_file.with_name(signing_key_file.name + ".pub")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """From the ``.pub`` PEM or from the private key file."""
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public
    except ValueError:
        pass
    raise AuditKeyError(f"{path} holds no Ed25519 key")
