"""The state database: SQLite by default (WAL, one file), PostgreSQL when several gateways share
state; any SQLAlchemy async URL otherwise. The schema is defined here once and created and moved
forward by the Alembic migrations in ``serving/storage/migrations`` (see ``migrate.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

metadata = MetaData()

clients = Table(
    "clients",
    metadata,
    Column("id", String(64), primary_key=True),  # a slug: "search-api"
    Column("policy", String(64), nullable=False),  # a policy name from the policy file
    Column("description", String(500), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the public key id embedded in the key
    Column("name", String(200), nullable=False),
    Column("digest", String(64), nullable=False),  # hex HMAC-SHA256(pepper, key)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("client_id", String(64), ForeignKey("clients.id"), nullable=True),
    Column("scopes", String(200), nullable=False, server_default=""),  # space-separated
    # "api": a bearer key; "secret": an OAuth client secret, only good at /oauth/token.
    Column("kind", String(16), nullable=False, server_default="api"),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("rotated_from", String(32), nullable=True),
    Index("ix_api_keys_name", "name"),
    Index("ix_api_keys_client", "client_id"),
)

# Token signing keys (OAuth client credentials). The private key is sealed with AES-256-GCM under
# a key derived from the server pepper: a copy of the database alone cannot mint tokens.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("algorithm", String(16), nullable=False),
    Column("sealed_private_key", Text, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True), nullable=True),
)

# The budget ledger. One row per client and period ("day" 2026-11-23, "month" 2026-11): tokens
# settled (used) and tokens held in gateways' leases (reserved).
budget_counters = Table(
    "budget_counters",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("period", String(10), primary_key=True),
    Column("used", BigInteger, nullable=False, server_default="0"),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
)

# Budget leases: tokens a gateway holds for one client and period (its requests reserve from
# them in memory). The live gateway renews its rows; a row whose gateway died expires and is
# released by a sweeper.
reservations = Table(
    "reservations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("day", String(10), nullable=False),
    Column("month", String(10), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_reservations_expires", "expires_at"),
)

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("model", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("requests", BigInteger, nullable=False, server_default="0"),
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
)

# Idempotency keys (``storage.idempotency``): one row per client and key, holding digests of the
# key and the body, never either of them, and the answer sealed with AES-256-GCM. A "pending"
# row is a claim by the gateway ``owner`` until ``lease_expires_at``; a "done" row replays its
# answer (NULL: too large to keep) until ``expires_at``.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("key_hash", String(64), primary_key=True),  # hex HMAC-SHA256 of the client's key
    Column("body_hash", String(64), nullable=False),  # hex HMAC-SHA256 of the request body
    Column("state", String(8), nullable=False),  # "pending" | "done"
    Column("owner", String(32), nullable=True),  # the claim's holder while pending
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("status", Integer, nullable=True),
    Column("answer", LargeBinary, nullable=True),  # nonce + AES-256-GCM ciphertext
    Column("model", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_idempotency_keys_expires", "expires_at"),
)

# Rollouts (``storage.rollouts``): one row per rollout, its state machine's position and the
# weights every gateway routes by; ``active_model`` is the model while the rollout is not
# finished (NULL after), so a model has at most one rollout under way. Times are epoch seconds
# (the analysis windows are counted from ``step_started``).
rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(64), nullable=False),
    Column("active_model", String(64), nullable=True, unique=True),
    Column("version", String(64), nullable=False),  # the canary
    Column("state", String(16), nullable=False),
    Column("paused", Integer, nullable=False, server_default="0"),
    Column("step", Integer, nullable=False, server_default="-1"),  # index into steps; -1: none
    Column("step_started", Float, nullable=True),
    Column("plan", Text, nullable=False),  # JSON: steps, durations, eval gate, thresholds
    Column("weights", Text, nullable=True),  # JSON: version -> percent; NULL: the manifest's
    Column("stable", Text, nullable=False),  # JSON: the stable versions' weights at the start
    Column("command", String(16), nullable=True),  # pause | resume | promote | abort, pending
    Column("command_by", String(128), nullable=True),
    Column("reason", Text, nullable=True),
    Column("detail", Text, nullable=True),  # JSON: the last analysis and the eval reports
    Column("created_by", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_rollouts_model", "model", "created_at"),
)
rollout_events = Table(
    "rollout_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", String(32), ForeignKey("rollouts.id"), nullable=False),
    Column("at", Float, nullable=False),
    Column("from_state", String(16), nullable=True),
    Column("to_state", String(16), nullable=False),
    Column("step", Integer, nullable=False),
    Column("weights", Text, nullable=True),
    Column("actor", String(128), nullable=False),
    Column("reason", Text, nullable=True),
    Index("ix_rollout_events_rollout", "rollout_id", "id"),
)
# Each gateway's counts for each version in each analysis window of a rollout's step
# (``rollouts.recorder``): written by that gateway only, summed by the controller.
rollout_windows = Table(
    "rollout_windows",
    metadata,
    Column("rollout_id", String(32), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("window", Integer, primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("gateway", String(64), primary_key=True),
    Column("stats", Text, nullable=False),  # JSON: counts and latency histograms
    Column("updated_at", Float, nullable=False),
)
# Leases: the gateway that holds one acts (the rollout controller), the others wait.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI write while the gateway reads. synchronous=NORMAL in WAL mode: a commit
    # survives the process being killed (SIGKILL), as the WAL is in the OS's page cache; only a
    # power loss can take the last commits. FULL would fsync on every ledger write.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = Path(parsed.database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() != "sqlite":
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def dialect_insert(engine: AsyncEngine, table: Table):  # type: ignore[no-untyped-def]
    """An INSERT with the dialect's ``on_conflict_do_*`` (PostgreSQL's or SQLite's)."""
    return (postgresql.insert(table) if engine.dialect.name == "postgresql"
            else sqlite.insert(table))
