"""The Alembic environment of the PostgreSQL store (env.py, versions/); run by
server.events.pg_migrate.migrate, never by the alembic command line."""
