"""Alembic environment: runs migrations online against the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

url = context.config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set"
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        # Several replicas may start at once; one migrates, the others wait and find it done.
        context.execute("SELECT pg_advisory_xact_lock(7261017)")
        context.run_migrations()
engine.dispose()
