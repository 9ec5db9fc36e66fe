"""Signed access tokens: the OAuth2 client-credentials issuer and the verifier for our own tokens
and an external identity provider's.

Our tokens are JWTs signed with Ed25519 (``EdDSA``), each naming its key (``kid``); the public
keys are published at ``/.well-known/jwks.json``. Private keys live in the state database sealed
with AES-256-GCM under a key derived from the server pepper, so every gateway sharing the
database and the pepper signs and verifies the same tokens, and a copy of the database alone
cannot mint any. Rotation makes a new key current; the old one stays published (and accepted)
until every token it signed has expired.

Verification never trusts the token's header: the algorithm comes from the key that the ``kid``
names, the issuer picks the key set, and ``alg: none``, HMAC algorithms and unknown ``kid`` are
refused. Verified tokens are cached until they expire, so the hot path verifies a token once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import OKPAlgorithm

from serving.storage.signing import SigningKeyRecord, SigningKeyRepository

log = logging.getLogger("enclave.tokens")
ALGORITHM = "EdDSA"
LEEWAY_S = 30
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                         "ES512", "EdDSA"})
_CACHE_MAX = 10_000
_MAX_TOKEN_LEN = 8192


class TokenRejected(Exception):
    """A token that must not be accepted. The message says why, without quoting the token."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    client_id: str
    scopes: frozenset[str] | None  # None: the token says nothing about scopes (external IdP)
    token_id: str
    expires_at: float
    external: bool


def looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2 and value.startswith("eyJ") and len(value) <= _MAX_TOKEN_LEN


class _Sealer:
    """AES-256-GCM under a key derived (HKDF-SHA256) from the server pepper."""

    def __init__(self, pepper: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"enclave/signing-keys/v1").derive(pepper)
        self._aead = AESGCM(key)

    def seal(self, data: bytes, kid: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, data, kid.encode())).decode()

    def unseal(self, sealed: str, kid: str) -> bytes:
        raw = base64.b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], kid.encode())


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    public: Any
    private: Ed25519PrivateKey | None
    jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None


class TokenIssuer:
    def __init__(self, repo: SigningKeyRepository, pepper: bytes, issuer: str, audience: str,
                 ttl_s: int) -> None:
        self._repo = repo
        self._sealer = _Sealer(pepper)
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self._keys: dict[str, _Key] = {}
        self._current: _Key | None = None
        self._last_refresh = 0.0

    async def start(self) -> None:
        await self.refresh()
        if self._current is None:
            await self.rotate()

    async def rotate(self) -> str:
        """Make a new signing key current. Tokens signed by the previous key stay valid."""
        private = Ed25519PrivateKey.generate()
        kid = f"enc-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        jwk.update(kid=kid, alg=ALGORITHM, use="sig")
        await self._repo.add(kid, ALGORITHM, self._sealer.seal(pem, kid),
                             orjson.dumps(jwk).decode(), retire_others=True)
        log.info("token signing key rotated", extra={"kid": kid})
        await self.refresh()
        return kid

    async def refresh(self) -> None:
        records = await self._repo.all()
        keys: dict[str, _Key] = {}
        for r in records:
            keys[r.kid] = self._key(r)
        self._keys = keys
        live = [k for k in keys.values() if k.retired_at is None and k.private is not None]
        self._current = max(live, key=lambda k: k.created_at) if live else None
        self._last_refresh = time.monotonic()

    async def refresh_if_stale(self, min_interval_s: float) -> bool:
        if time.monotonic() - self._last_refresh < min_interval_s:
            return False
        await self.refresh()
        return True

    def _key(self, r: SigningKeyRecord) -> _Key:
        jwk = orjson.loads(r.public_jwk)
        public = OKPAlgorithm.from_jwk(r.public_jwk)
        private: Ed25519PrivateKey | None = None
        if r.retired_at is None:
            try:
                loaded = serialization.load_pem_private_key(
                    self._sealer.unseal(r.sealed_private_key, r.kid), password=None)
                assert isinstance(loaded, Ed25519PrivateKey)
                private = loaded
            except Exception:  # a key sealed under another pepper: skip it
                log.error("cannot unseal a token signing key (another pepper?)",
                          extra={"kid": r.kid})
        return _Key(r.kid, public, private, jwk, r.created_at, r.retired_at)

    def published(self) -> list[_Key]:
        """Keys whose tokens may still be alive: current ones and those retired less than a
        token lifetime (plus leeway) ago."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.ttl_s + LEEWAY_S)
        return [k for k in self._keys.values()
                if k.retired_at is None or k.retired_at > horizon]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.published()]}

    def public_key(self, kid: str) -> Any | None:
        for k in self.published():
            if k.kid == kid:
                return k.public
        return None

    def issue(self, client_id: str, scopes: frozenset[str]) -> tuple[str, int]:
        key = self._current
        if key is None or key.private is None:
            raise RuntimeError("no token signing key")
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": client_id,
                  "client_id": client_id, "scope": " ".join(sorted(scopes)), "iat": now,
                  "nbf": now, "exp": now + self.ttl_s, "jti": secrets.token_hex(16)}
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})
        return token, self.ttl_s


@dataclass(frozen=True)
class ExternalIdP:
    issuer: str
    audience: str
    jwks_url: str
    client_claim: str = "azp"


class _RemoteKeySet:
    """An identity provider's JWKS, fetched over HTTP, cached, refreshed on an unknown ``kid``
    (at most once per ``min_refresh_s``) and every ``ttl_s``."""

    def __init__(self, url: str, client: httpx.AsyncClient, ttl_s: float = 600.0,
                 min_refresh_s: float = 10.0) -> None:
        self.url = url
        self._client = client
        self._ttl = ttl_s
        self._min_refresh = min_refresh_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None and now - self._fetched_at < self._ttl:
            return key
        if now - self._fetched_at >= self._min_refresh:
            async with self._lock:
                if time.monotonic() - self._fetched_at >= self._min_refresh:
                    await self._fetch()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            resp = await self._client.get(self.url, timeout=5.0)
            resp.raise_for_status()
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot fetch the identity provider's JWKS",
                        extra={"url": self.url, "reason": type(exc).__name__})
            return
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or "kid" not in entry or entry.get("kty") == "oct":
                continue  # symmetric keys have no place in a public key set
            try:
                keys[str(entry["kid"])] = jwt.PyJWK(entry)
            except jwt.PyJWTError:  # PyJWKError, and InvalidKeyError (e.g. an X25519 key)
                continue
        self._keys = keys


def check_jwks_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in
                                   ("127.0.0.1", "localhost", "::1")):
        return url
    raise ValueError("the identity provider's JWKS URL must be https (http only on loopback)")


class TokenVerifier:
    def __init__(self, issuer: TokenIssuer, external: ExternalIdP | None,
                 client: httpx.AsyncClient | None) -> None:
        self._issuer = issuer
        self._external = external
        self._remote = (_RemoteKeySet(check_jwks_url(external.jwks_url), client)
                        if external is not None and client is not None else None)
        self._cache: OrderedDict[str, TokenClaims] = OrderedDict()

    async def verify(self, token: str) -> TokenClaims:
        hit = self._cache.get(token)
        if hit is not None and hit.expires_at > time.time():
            return hit
        claims = await self._verify(token)
        self._cache[token] = claims
        while len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return claims

    async def _verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if alg not in _ASYMMETRIC:
            raise TokenRejected("token algorithm not accepted")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token has no key id")
        iss = unverified.get("iss")
        if iss == self._issuer.issuer:
            return await self._verify_own(token, kid)
        if self._external is not None and iss == self._external.issuer:
            return await self._verify_external(token, kid)
        raise TokenRejected("token issuer not accepted")

    async def _verify_own(self, token: str, kid: str) -> TokenClaims:
        key = self._issuer.public_key(kid)
        if key is None and await self._issuer.refresh_if_stale(5.0):
            key = self._issuer.public_key(kid)  # a key rotated on another gateway
        if key is None:
            raise TokenRejected("token signed by an unknown key")
        claims = self._decode(token, key, ALGORITHM, self._issuer.issuer, self._issuer.audience)
        client_id = claims.get("client_id") or claims.get("sub")
        scope = claims.get("scope")
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise TokenRejected("token lacks client or scope")
        return TokenClaims(client_id, frozenset(scope.split()), str(claims.get("jti", "")),
                           float(claims["exp"]), external=False)

    async def _verify_external(self, token: str, kid: str) -> TokenClaims:
        assert self._external is not None and self._remote is not None
        jwk = await self._remote.get(kid)
        if jwk is None:
            raise TokenRejected("token signed by an unknown key")
        alg = jwk.algorithm_name
        if alg not in _ASYMMETRIC:
            raise TokenRejected("token algorithm not accepted")
        claims = self._decode(token, jwk.key, alg, self._external.issuer, self._external.audience)
        client_id = claims.get(self._external.client_claim)
        if not isinstance(client_id, str) or not client_id:
            raise TokenRejected(f"token lacks the '{self._external.client_claim}' claim")
        scopes: frozenset[str] | None = None
        if isinstance(claims.get("scope"), str):
            scopes = frozenset(claims["scope"].split())
        elif isinstance(claims.get("scp"), list):
            scopes = frozenset(str(s) for s in claims["scp"])
        return TokenClaims(client_id, scopes, str(claims.get("jti", "")),
                           float(claims["exp"]), external=True)

    @staticmethod
    def _decode(token: str, key: Any, alg: str, issuer: str, audience: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key, algorithms=[alg], audience=audience, issuer=issuer,
                leeway=LEEWAY_S, options={"require": ["exp", "iat", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("token issuer not accepted") from None
        except jwt.PyJWTError:
            raise TokenRejected("token signature or claims invalid") from None
        return claims
