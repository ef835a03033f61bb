"""The PostgreSQL store's migrations (server/events/pg_migrate.py) on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from server.errors import SchemaTooNew, StoreUnavailable
from server.events.pg_migrate import head_revision, migrate


def _schema() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


async def _revision(url: str, schema: str) -> str:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(f'SELECT version_num FROM "{schema}".alembic_version')
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])


async def test_migrate_creates_the_schema_at_head_and_is_idempotent(postgres_url: str) -> None:
    schema = _schema()
    assert await migrate(postgres_url, schema) == head_revision()
    assert await migrate(postgres_url, schema) == head_revision()
    assert await _revision(postgres_url, schema) == head_revision()


async def test_servers_starting_together_migrate_one_after_the_other(postgres_url: str) -> None:
    schema = _schema()
    heads = await asyncio.gather(*(migrate(postgres_url, schema) for _ in range(4)))
    assert heads == [head_revision()] * 4
    assert await _revision(postgres_url, schema) == head_revision()


async def test_a_schema_migrated_by_a_newer_keel_is_refused_naming_its_revision(
    postgres_url: str,
) -> None:
    schema = _schema()
    await migrate(postgres_url, schema)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute(f"UPDATE \"{schema}\".alembic_version SET version_num = '9999_future'")
    with pytest.raises(SchemaTooNew, match="9999_future") as refused:
        await migrate(postgres_url, schema)
    assert refused.value.revision == "9999_future"
    assert schema in str(refused.value)


async def test_an_unreachable_database_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="PostgreSQL unreachable"):
        await migrate("postgresql://postgres@127.0.0.1:1/postgres", _schema())
