"""Alembic's environment for Keel's PostgreSQL store.

Only server.events.pg_migrate.migrate runs it: it hands over, in the
Config's attributes, an open SQLAlchemy connection (already holding the
migration advisory lock) and the schema to migrate. Every revision runs with
search_path set to that schema, and the version table (alembic_version)
lives in it too, so several Keel deployments (or tests) share one database
in separate schemas.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from server.events import sql
from server.events.pg_migrate import quote_ident

config = context.config
connection: Connection = config.attributes["connection"]
schema: str = config.attributes["schema"]

connection.execute(text(sql.SET_SEARCH_PATH.format(schema=quote_ident(schema))))
context.configure(
    connection=connection,
    version_table_schema=schema,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
