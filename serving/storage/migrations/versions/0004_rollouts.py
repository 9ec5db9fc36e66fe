"""Rollouts: their state and weights, their transitions, the analysis windows' counts, leases.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("active_model", sa.String(64), nullable=True, unique=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("paused", sa.Integer, nullable=False, server_default="0"),
        sa.Column("step", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("step_started", sa.Float, nullable=True),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("weights", sa.Text, nullable=True),
        sa.Column("stable", sa.Text, nullable=False),
        sa.Column("command", sa.String(16), nullable=True),
        sa.Column("command_by", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_rollouts_model", "rollouts", ["model", "created_at"])
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.String(32), sa.ForeignKey("rollouts.id"), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("weights", sa.Text, nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
    )
    op.create_index("ix_rollout_events_rollout", "rollout_events", ["rollout_id", "id"])
    op.create_table(
        "rollout_windows",
        sa.Column("rollout_id", sa.String(32), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("window", sa.Integer, primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("gateway", sa.String(64), primary_key=True),
        sa.Column("stats", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("rollout_windows")
    op.drop_index("ix_rollout_events_rollout", "rollout_events")
    op.drop_table("rollout_events")
    op.drop_index("ix_rollouts_model", "rollouts")
    op.drop_table("rollouts")
