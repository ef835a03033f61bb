"""Starting a server on PostgreSQL, and what it refuses: `python -m server serve` as an
operator runs it, with a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import psycopg
import pytest

from server.events.postgres import schema_of
from tests.processes import ROOT, start_keel_process

DEADLINE_S = 60
SCRIPTED = "server.agents.testing:registry"


@pytest.fixture
def backend() -> str:
    return "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def serve(*flags: str) -> subprocess.CompletedProcess[bytes]:
    """`serve` with `flags`, expected to exit on its own."""
    command = [sys.executable, "-m", "server", "serve", "--port", "0", "--agents", SCRIPTED]
    return await asyncio.to_thread(
        subprocess.run,
        [*command, *flags],
        cwd=ROOT,
        env={**os.environ, "KEEL_SHUTDOWN_GRACE_S": "0"},
        capture_output=True,
        timeout=DEADLINE_S,
    )


async def test_redis_and_postgres_together_are_refused(postgres_url: str, redis_url: str) -> None:
    refused = await serve("--redis-url", redis_url, "--postgres-url", postgres_url)
    assert refused.returncode != 0
    assert b"give one store" in refused.stderr and b"not both" in refused.stderr


async def test_a_url_that_is_not_postgresql_is_refused() -> None:
    refused = await serve("--postgres-url", "mysql://keel@127.0.0.1/keel")
    assert refused.returncode != 0
    assert b"must look like postgresql://" in refused.stderr


async def test_an_unreachable_database_stops_the_server_with_one_clear_line() -> None:
    refused = await serve("--postgres-url", f"postgresql://keel@127.0.0.1:{free_port()}/keel")
    assert refused.returncode == 1
    assert b"cannot reach the store at start" in refused.stderr
    assert b"Traceback" not in refused.stderr


async def test_a_schema_migrated_by_a_newer_keel_is_refused(
    postgres_url: str, key_prefix: str
) -> None:
    # A first server migrates the schema; then a newer Keel (as far as this one can
    # tell) moved it to a revision this code does not know.
    first = await start_keel_process(redis_url=postgres_url, key_prefix=key_prefix)
    first.terminate()
    await first.wait()
    schema = schema_of(key_prefix)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        await admin.execute(f"UPDATE \"{schema}\".alembic_version SET version_num = '0999_later'")
    refused = await serve("--postgres-url", postgres_url, "--key-prefix", key_prefix)
    assert refused.returncode == 1
    assert b"0999_later" in refused.stderr and b"newer Keel" in refused.stderr
    assert b"Traceback" not in refused.stderr


async def test_servers_starting_together_migrate_once_and_all_serve(
    postgres_url: str, key_prefix: str
) -> None:
    servers = await asyncio.gather(
        *(start_keel_process(redis_url=postgres_url, key_prefix=key_prefix) for _ in range(3))
    )
    try:
        schema = schema_of(key_prefix)
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
            cursor = await admin.execute(f'SELECT version_num FROM "{schema}".alembic_version')
            assert len(await cursor.fetchall()) == 1
    finally:
        for server in servers:
            server.kill()
            await server.wait()
