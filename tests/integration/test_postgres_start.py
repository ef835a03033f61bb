"""Starting a server on PostgreSQL, and what it refuses: `python -m server serve` as an
operator runs it, with a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import grpc
import psycopg
import pytest
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from server.events.postgres import schema_of
from tests.integration.conftest import collect, script, text
from tests.integration.test_streams import error_info
from tests.postgres import start_postgres
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


async def test_a_database_lost_mid_run_is_unavailable_with_retry_info(
    start_keel: Callable[..., Awaitable[Keel]],
) -> None:
    """As on Redis (test_server.py): an outage answers UNAVAILABLE with RetryInfo, and the
    run is not failed for it: its task stops, leaving it to whoever owns it later."""
    database = start_postgres()
    try:
        keel = await start_keel(postgres_url=database.url, lease_ttl_s=1.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            started = await stub.StartRun(
                pb.StartRunRequest(agent_id="scripted", input=script(text(1000, delay_ms=5)))
            )
            run_id = started.run.run_id
            while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 5:
                await asyncio.sleep(0.01)
            database.stop()  # the outage
            for call in (
                lambda: stub.GetRun(pb.GetRunRequest(run_id=run_id)),
                lambda: collect(stub.Observe(pb.ObserveRequest(run_id=run_id))),
                lambda: stub.StartRun(
                    pb.StartRunRequest(agent_id="scripted", input=script(text(1)))
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
                assert status is not None
                kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
                assert {"ErrorInfo", "RetryInfo"} <= kinds
                assert error_info(err.value).reason == "STORE_UNAVAILABLE"
            async with asyncio.timeout(60):
                while keel.executor.running:
                    await asyncio.sleep(0.05)
    finally:
        database.stop()
