"""The one settings object: read from the environment (``ENCLAVE_*``) when the CLI builds it.

Nothing here runs at import time. Unsafe values are refused when the object is built, with a
message that says how to fix them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values people paste from tutorials. A pepper equal to one of these protects nothing.
KNOWN_DEFAULT_PEPPERS = frozenset(
    {"", "changeme", "change-me", "secret", "pepper", "password", "dev", "dev-pepper", "enclave",
     "test", "default", "insecure", "xxx"}
)
MIN_PEPPER_LENGTH = 32


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "enclave"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "enclave"


def _default_policies_file() -> Path:
    here = Path(__file__).resolve().parent.parent / "config" / "policies.yaml"
    return here if here.is_file() else Path("config") / "policies.yaml"


def _default_models_dir() -> Path:
    # The repository's models/ when running from a checkout; otherwise ./models.
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path("models")


def _default_evals_dir() -> Path:
    # The repository's evals/ when running from a checkout; otherwise ./evals.
    here = Path(__file__).resolve().parent.parent / "evals"
    return here if here.is_dir() else Path("evals")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_", extra="ignore")

    dev_mode: bool = Field(False, description="Relaxes start-up checks; never in production.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ops_host: str = Field("127.0.0.1", description="Where the operations listener binds")
    ops_port: int | None = Field(
        None, ge=1, le=65535, description="A second listener for /metrics and /readyz detail "
        "(loopback or an admin network); the API port then serves neither. /healthz stays "
        "on both")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request's headers must arrive within this long of its "
        "first byte (or of the connection's opening), else 408 and the connection closes")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Its body within this long of the headers, else 408")
    keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections close")
    max_concurrent_requests: int = Field(
        1024, ge=1, description="Requests in progress at once (health checks excepted); "
        "beyond, 503 with Retry-After")
    unknown_key_lookups_per_minute: int = Field(
        600, ge=1, description="Database lookups of key ids that match no key, per client "
        "address and minute; beyond, that address's uncached keys get 429 without a query")

    data_dir: Path = Field(default_factory=_default_data_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    models_dir: Path = Field(default_factory=_default_models_dir)
    evals_dir: Path = Field(
        default_factory=_default_evals_dir, description="Evaluation sets (`enclave eval`): "
        "one folder of *.jsonl files per set")
    model_store: Path | None = Field(
        None, description="Imported weights (`enclave models import`), kept by content: "
        "<model_store>/sha256/ and one folder of links per version in <model_store>/versions/; "
        "default <data_dir>/model-store. Not a cache: imported versions are served from it")
    engine_env: Path | None = Field(
        None, description="The engines' virtualenv (vLLM); default <cache_dir>/engine-venv. "
        "An image sets it to a read-only path built in")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default SQLite in data_dir. PostgreSQL: "
        "postgresql+asyncpg://user:pass@host/db")
    auto_migrate: bool = Field(True, description="Apply schema migrations at start.")
    policies_file: Path = Field(default_factory=_default_policies_file)
    policy_reload_interval_s: float = Field(2.0, gt=0)
    manifest_reload_interval_s: float = Field(
        2.0, gt=0, description="How often the gateway and the supervisor look for a new or "
        "changed manifest in models_dir (a bad one is refused; the running set stays)")
    rollout_controller: bool = Field(
        True, description="This gateway may run rollouts (the one holding the lease in the "
        "state database acts; the others stand by)")
    rollout_follow_interval_s: float = Field(
        1.0, gt=0, le=10, description="How often the gateway reads the rollouts' weights "
        "and writes its analysis counts")
    redis_url: str | None = Field(
        None, description="redis://host:port/db: rate limits shared by every gateway")
    reservation_ttl_s: float = Field(
        60.0, ge=10, description="A gateway's budget lease not renewed for this long (the "
        "gateway died) is released; live gateways renew theirs every third of it")
    ledger_sweep_interval_s: float = Field(30.0, gt=0)
    last_used_flush_s: float = Field(5.0, gt=0)

    oauth_issuer: str = Field("enclave", min_length=1)
    oauth_audience: str = Field("enclave-gateway", min_length=1)
    oauth_token_ttl_s: int = Field(600, ge=30, le=86400)
    oidc_issuer: str | None = Field(None, description="An external identity provider's issuer")
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    oidc_client_claim: str = Field("azp", description="The claim naming the Enclave client")
    oidc_admin_scope: str | None = Field(
        None, min_length=1, description="The scope in an external provider's token that "
        "grants Enclave's admin scope (e.g. enclave:admin); unset: external tokens never get "
        "admin, whatever they carry")

    pepper: SecretStr | None = None
    pepper_file: Path | None = None

    max_body_bytes: int = Field(1 << 20, ge=1024)
    inspect_timeout_s: float = Field(
        1.5, gt=0, description="The most time one request's text may take to validate and "
        "inspect (personal data, guards); past it the request is refused (413)")
    inspect_inline_bytes: int = Field(
        32768, ge=0, description="Bodies up to this size are prepared on the event loop; "
        "larger ones in a worker thread")
    inspect_workers: int = Field(2, ge=1, le=64, description="Worker threads for large bodies")
    upstream_connect_timeout_s: float = Field(2.0, gt=0)
    upstream_read_timeout_s: float = Field(120.0, gt=0)
    upstream_first_byte_timeout_s: float = Field(
        10.0, gt=0, description="An attempt without its first byte (a stream's first chunk, "
        "an answer's headers) is abandoned and retried elsewhere once this long has passed "
        "since the later of its start and the replica's last sign of life (a health check "
        "answered): a hung engine loses its requests, a live one generating a long answer "
        "does not. Also ends a stream whose engine stops answering mid-way")
    upstream_max_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per request, on different replicas")
    upstream_retry_budget: float = Field(
        0.2, ge=0, le=1, description="Retries per model, as a share of requests: each "
        "request earns this much of a retry (a refused connection retries for free)")
    ejection_failures: int = Field(
        3, ge=1, description="Consecutive engine 5xx or broken connections that eject a "
        "replica (a refused connection or a first-byte timeout ejects at once)")
    ejection_base_s: float = Field(
        1.0, gt=0, description="The first ejection's length; each one in a row doubles it")
    ejection_max_s: float = Field(30.0, gt=0)
    engine_ca_file: Path | None = Field(
        None, description="The private CA that signs the engines' TLS certificates (https "
        "endpoints); default the system's")
    engine_cert_file: Path | None = Field(
        None, description="The gateway's client certificate for mutual TLS with engines")
    engine_key_file: Path | None = Field(None, description="Its private key")
    allow_plaintext_engines: bool = Field(
        False, description="Allow http:// endpoints off loopback: prompts cross the network "
        "in clear; only inside a closed network")
    endpoint_resolve_interval_s: float = Field(
        5.0, gt=0, description="Engine endpoints given by name are re-resolved this often")
    supervisor_socket: Path | None = Field(
        None, description="The engine supervisor's events socket, for replica events the "
        "moment they happen; default <data_dir>/run/events.sock (followed when it exists)")
    upstream_keepalive_s: float = Field(
        4.0, gt=0, description="Idle pooled connections to engines close after this; keep it "
        "below the engines' own keep-alive (vLLM: 5 s), so the gateway never sends on a "
        "connection the engine is closing")
    retry_after_s: int = Field(5, ge=1)
    engine_health_interval_s: float = Field(1.0, gt=0)
    key_cache_ttl_s: float = Field(2.0, ge=0)
    engine_host: str = Field(
        "127.0.0.1", description="Where the engines listen (their ports are in the manifests): "
        "loopback when they run beside the gateway, the engine host's private address otherwise")
    allow_remote_engines: bool = Field(
        False, description="Allow engine URLs outside loopback and private ranges."
    )
    exporter_port: int = Field(
        9400, ge=0, le=65535, description="`enclave up` starts the GPU exporter on this "
        "loopback port (DCGM's); 0: not started")
    worker: int | None = Field(
        None, ge=0, description="Set by `enclave gateway --workers N` for each worker process "
        "(its audit chain and metrics are its own); not set by hand")
    idempotency_ttl_s: float = Field(
        86400.0, ge=60, description="How long an Idempotency-Key's answer is kept (from the "
        "first request)")
    idempotency_max_answer_bytes: int = Field(
        1 << 20, ge=1024, description="Answers larger than this are not kept; a duplicate "
        "gets 422 (use a new key)")
    idempotency_wait_s: float = Field(
        120.0, gt=0, description="A duplicate arriving while the first is still running "
        "waits this long for its answer, then gets 409 with Retry-After")
    otlp_endpoint: str | None = Field(
        None, description="An OpenTelemetry collector's OTLP/HTTP base URL (e.g. "
        "http://10.0.0.5:4318): spans of each inference request, its admission and each "
        "upstream attempt are exported there; unset, only the client's traceparent is passed on")
    otlp_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of requests without a sampled parent that are traced")
    log_level: str = "INFO"
    access_log: bool = True

    audit_dir: Path | None = Field(
        None, description="The audit trails (one chain of hash-chained segments and signed "
        "checkpoints per gateway, in <host>-<port>/); default <data_dir>/audit")
    audit_keys_dir: Path | None = Field(
        None, description="AES-256-GCM keys for encrypted audit content, one <key_id>.key "
        "file each (mode 0600); default <data_dir>/audit-keys")
    audit_key_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The key that encrypts new "
        "content; default the newest key in audit_keys_dir")
    audit_signing_key_file: Path | None = Field(
        None, description="The Ed25519 key that signs checkpoints; default "
        "<data_dir>/audit-signing.key (created at first start, mode 0600)")
    audit_checkpoint_every: int = Field(256, ge=1, description="Records between checkpoints")
    audit_checkpoint_interval_s: float = Field(
        10.0, gt=0, description="A checkpoint at least this often while records arrive")
    audit_fsync_interval_s: float = Field(
        1.0, ge=0, description="fsync the audit trail at most this long after a write; 0: "
        "fsync every batch before requests are answered")
    audit_segment_bytes: int = Field(64 << 20, ge=1 << 16)
    audit_retention_days: int | None = Field(
        None, ge=1, description="Purge whole segments older than this; none: keep all")
    audit_queue_size: int = Field(10000, ge=16)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.pepper is not None and self.pepper_file is not None:
            raise ValueError("set ENCLAVE_PEPPER or ENCLAVE_PEPPER_FILE, not both")
        oidc = (self.oidc_issuer, self.oidc_audience, self.oidc_jwks_url)
        if any(oidc) and not all(oidc):
            raise ValueError("an external identity provider needs ENCLAVE_OIDC_ISSUER, "
                             "ENCLAVE_OIDC_AUDIENCE and ENCLAVE_OIDC_JWKS_URL together")
        if self.oidc_issuer is not None and self.oidc_issuer == self.oauth_issuer:
            raise ValueError("ENCLAVE_OIDC_ISSUER must differ from ENCLAVE_OAUTH_ISSUER")
        if self.ops_port is not None and self.ops_port == self.port:
            raise ValueError("ENCLAVE_OPS_PORT must differ from ENCLAVE_PORT")
        if (self.engine_cert_file is None) != (self.engine_key_file is None):
            raise ValueError("ENCLAVE_ENGINE_CERT_FILE and ENCLAVE_ENGINE_KEY_FILE go together")
        if self.redis_url is not None and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError("ENCLAVE_REDIS_URL must start with redis://, rediss:// or unix://")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'enclave.db'}"

    @property
    def default_pepper_file(self) -> Path:
        return self.data_dir / "pepper"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def resolved_supervisor_socket(self) -> Path:
        return self.supervisor_socket or self.run_dir / "events.sock"

    @property
    def resolved_audit_dir(self) -> Path:
        return self.audit_dir or self.data_dir / "audit"

    @property
    def audit_chain_dir(self) -> Path:
        """This gateway's own chain: gateways sharing a data directory (several processes,
        one host) each write their own, named by host and port (and worker), continued across
        restarts."""
        worker = f"-w{self.worker}" if self.worker is not None else ""
        return self.resolved_audit_dir / f"{socket.gethostname()}-{self.port}{worker}"

    @property
    def resolved_audit_keys_dir(self) -> Path:
        return self.audit_keys_dir or self.data_dir / "audit-keys"

    @property
    def resolved_audit_signing_key_file(self) -> Path:
        return self.audit_signing_key_file or self.data_dir / "audit-signing.key"

    @property
    def model_store_dir(self) -> Path:
        return self.model_store or self.data_dir / "model-store"

    @property
    def engine_env_dir(self) -> Path:
        return self.engine_env or self.cache_dir / "engine-venv"

    def ensure_pepper_file(self) -> bool:
        """Create a random pepper in the data directory if none is configured. True if created."""
        if self.pepper is not None or self.pepper_file is not None:
            return False
        path = self.default_pepper_file
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        return True

    def load_pepper(self) -> bytes:
        """Return the server pepper, refusing a missing or known-default one (outside dev mode)."""
        pepper_file = self.pepper_file
        if pepper_file is None and self.pepper is None and self.default_pepper_file.exists():
            pepper_file = self.default_pepper_file
        if pepper_file is not None:
            try:
                mode = pepper_file.stat().st_mode
                value = pepper_file.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"cannot read the pepper file {pepper_file}: {exc.strerror}"
                ) from None
            if mode & 0o077 and not self.dev_mode:
                raise ValueError(
                    f"the pepper file {pepper_file} is readable by other users; "
                    f"run `chmod 600 {pepper_file}`"
                )
        elif self.pepper is not None:
            value = self.pepper.get_secret_value().strip()
        else:
            raise ValueError(
                f"no pepper: create {self.default_pepper_file} (`enclave up` does), set "
                "ENCLAVE_PEPPER_FILE to a file holding a random secret "
                "(e.g. `openssl rand -hex 32 > pepper && chmod 600 pepper`) or ENCLAVE_PEPPER"
            )
        if not self.dev_mode:
            if value.lower() in KNOWN_DEFAULT_PEPPERS:
                raise ValueError(
                    "the pepper is a known default value; generate a random one "
                    "(`openssl rand -hex 32`)"
                )
            if len(value) < MIN_PEPPER_LENGTH:
                raise ValueError(
                    f"the pepper is shorter than {MIN_PEPPER_LENGTH} characters; generate a "
                    "random one (`openssl rand -hex 32`)"
                )
        return value.encode()


def is_allowed_engine_host(host: str, allow_remote: bool) -> bool:
    """Engines hold control endpoints: by default only loopback or private addresses.

    A name (an internal load balancer's, say) is resolved once, at start-up: allowed when every
    address it resolves to is loopback or private; a name that does not resolve is refused.
    """
    if allow_remote:
        return True
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return bool(addrs) and all(a.is_loopback or a.is_private for a in addrs)
