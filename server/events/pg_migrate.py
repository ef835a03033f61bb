"""The PostgreSQL store's schema migrations: Alembic, run by the server at start.

The revisions are raw SQL in server/events/migrations/versions (0001: the
event log; later ones add the other stores' tables). `migrate(url, schema)`
brings the schema up to the newest revision this code knows:

1. connect (StoreUnavailable, with the reason, if the database cannot be
   reached: the server refuses to start rather than loop);
2. take a session advisory lock named after the schema, so servers that
   start together migrate one after the other (the later ones find nothing
   to do);
3. create the schema if it is missing, and read its alembic_version: a
   revision this code does not know means the database was migrated by a
   newer Keel, and SchemaTooNew refuses to start, naming the revision;
4. `alembic upgrade head`, each revision in its own transaction.

Alembic is synchronous (SQLAlchemy with the psycopg driver): the async
wrapper runs it in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from server.errors import SchemaTooNew, StoreUnavailable
from server.events import sql

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_NAMESPACE = "keel-migrate:"


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def sqlalchemy_url(url: str) -> str:
    """A libpq URL (postgresql://, postgres://) as SQLAlchemy's psycopg 3 URL."""
    for scheme in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def alembic_config(connection: Connection, schema: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection, schema: str) -> str | None:
    """The schema's alembic revision, None before the first migration."""
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


def migrate_sync(url: str, schema: str) -> str:
    """Bring `schema` to the newest revision (see the module docstring); returns it."""
    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
        except (OperationalError, DBAPIError) as error:
            raise StoreUnavailable(f"PostgreSQL unreachable: {error.orig or error}") from error
        with connection:
            key = _LOCK_NAMESPACE + schema
            connection.execute(text(sql.MIGRATION_LOCK), {"key": key})
            try:
                connection.execute(text(sql.CREATE_SCHEMA.format(schema=quote_ident(schema))))
                connection.commit()
                script = ScriptDirectory(str(MIGRATIONS))
                head = head_revision()
                revision = current_revision(connection, schema)
                connection.commit()
                if revision is not None:
                    try:
                        known = script.get_revision(revision)
                    except CommandError:
                        known = None
                    if known is None:
                        raise SchemaTooNew(schema, revision, head)
                command.upgrade(alembic_config(connection, schema), "head")
                connection.commit()
                return head
            finally:
                connection.rollback()
                connection.execute(text(sql.MIGRATION_UNLOCK), {"key": key})
                connection.commit()
    finally:
        engine.dispose()


async def migrate(url: str, schema: str) -> str:
    """migrate_sync in a thread; raises StoreUnavailable, SchemaTooNew."""
    return await asyncio.to_thread(migrate_sync, url, schema)
