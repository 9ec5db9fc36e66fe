"""Alembic environment. Migrations run inside the gateway or the CLI (``serving.storage.migrate``),
which hands over an open connection; there is no alembic.ini to keep in sync.
"""

from __future__ import annotations

from alembic import context

from serving.storage.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `enclave db upgrade` (serving.storage.migrate)")

context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
