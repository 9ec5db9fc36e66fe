"""Persistence only: the state database (keys, clients, budgets, signing keys, idempotency keys;
SQLite or PostgreSQL, migrated with Alembic), the audit log's files, and the manifests and
policy file on disk read into ``domain`` schemas. Imports ``domain`` and nothing above it."""
