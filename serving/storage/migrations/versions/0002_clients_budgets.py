"""Clients, scoped and expiring keys, token signing keys, the budget ledger and daily usage.

Keys made before clients existed are given to a client named ``default`` (policy ``default``)
with the inference scopes they had implicitly.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    clients = op.create_table(
        "clients",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("description", sa.String(500), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("client_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("scopes", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="api"))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotated_from", sa.String(32), nullable=True))
        batch.create_foreign_key("fk_api_keys_client", "clients", ["client_id"], ["id"])
        batch.create_index("ix_api_keys_client", ["client_id"])

    conn = op.get_bind()
    if conn.execute(sa.text("SELECT count(*) FROM api_keys")).scalar():
        op.bulk_insert(clients, [{"id": "default", "policy": "default", "description":
                                  "keys created before clients existed",
                                  "created_at": datetime.now(UTC), "disabled_at": None}])
        conn.execute(sa.text("UPDATE api_keys SET client_id = 'default', "
                             "scopes = 'chat completions embeddings models'"))

    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("sealed_private_key", sa.Text, nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "budget_counters",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("period", sa.String(10), primary_key=True),
        sa.Column("used", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("month", sa.String(10), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reservations_expires", "reservations", ["expires_at"])
    op.create_table(
        "usage_daily",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for table in ("usage_daily", "reservations", "budget_counters", "signing_keys"):
        op.drop_table(table)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_client")
        batch.drop_constraint("fk_api_keys_client", type_="foreignkey")
        for column in ("rotated_from", "last_used_at", "expires_at", "kind", "scopes",
                       "client_id"):
            batch.drop_column(column)
    op.drop_table("clients")
