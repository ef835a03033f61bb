"""PostgreSQL failing under running servers (real processes): a restart of the database
mid-run, and the server's LISTEN connection killed mid-run. Runs go on and a client that
resumes from its next offset gets every event exactly once."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import grpc
import psycopg
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.postgres import schema_of
from tests.chaos.conftest import (
    CHAOS_ENV,
    effective_events,
    expected_text,
    kinds,
    script,
    text_of,
)
from tests.postgres import PG_BIN, PostgresServer, _as_owner, start_postgres
from tests.processes import KeelProcess, start_keel_process

DELTAS = 300
FOLLOW_TIMEOUT_S = 120.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, which it may restart."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


def restart(server: PostgresServer) -> None:
    """`pg_ctl restart -m fast`: every connection is closed, the server comes back on the
    same port with the same data (what a maintenance restart or a failover looks like)."""
    subprocess.run(
        _as_owner(
            [str(PG_BIN / "pg_ctl"), "-D", str(server.datadir), "-m", "fast", "-w", "restart"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def follow(
    target: str, run_id: str, on_event: Callable[[int], Awaitable[None]]
) -> list[pb.AgentEvent]:
    """Observe the run to its end, resuming from the next offset after every UNAVAILABLE;
    every event must be the next one."""
    events: list[pb.AgentEvent] = []
    async with asyncio.timeout(FOLLOW_TIMEOUT_S), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        while True:
            try:
                request = pb.ObserveRequest(run_id=run_id, offset=len(events))
                async for response in stub.Observe(request):
                    if response.WhichOneof("kind") != "events":
                        continue
                    for event in response.events.events:
                        assert event.index == len(events), (event.index, len(events))
                        events.append(event)
                    await on_event(len(events))
                if events and kinds(events)[-1] == "finish":
                    return events
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            await asyncio.sleep(0.05)


async def start_run(server: KeelProcess) -> str:
    async with grpc.aio.insecure_channel(server.target) as channel:
        started = await pb_grpc.AgentServiceStub(channel).StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(DELTAS)))
        )
        return started.run.run_id


def text(count: int) -> dict[str, int]:
    return {"text": count, "delay_ms": 5}


def assert_whole(events: list[pb.AgentEvent]) -> None:
    """Gap-free, one finish, and the whole text once the superseded attempts are dropped."""
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events).count("finish") == 1
    assert text_of(effective_events(events)) == expected_text(text(DELTAS))


async def test_runs_go_on_and_clients_resume_across_a_postgres_restart(
    own_postgres: PostgresServer, key_prefix: str
) -> None:
    server = await start_keel_process(
        redis_url=own_postgres.url, key_prefix=key_prefix, env=CHAOS_ENV
    )
    try:
        run_id = await start_run(server)
        restarted: list[int] = []

        async def restart_at_100(received: int) -> None:
            if received >= 100 and not restarted:
                restarted.append(received)
                await asyncio.to_thread(restart, own_postgres)

        events = await follow(server.target, run_id, restart_at_100)
        assert restarted
        assert_whole(events)
    finally:
        server.kill()
        await server.wait()


async def test_observers_recover_when_the_listen_connection_is_killed(
    postgres_url: str, key_prefix: str
) -> None:
    server = await start_keel_process(redis_url=postgres_url, key_prefix=key_prefix, env=CHAOS_ENV)
    try:
        run_id = await start_run(server)
        killed: list[int] = []

        async def kill_listen_at_50(received: int) -> None:
            if received >= 50 and not killed:
                async with await psycopg.AsyncConnection.connect(
                    postgres_url, autocommit=True
                ) as admin:
                    cursor = await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s",
                        (f"keel-listen-{schema_of(key_prefix)}",),
                    )
                    killed.append(len(await cursor.fetchall()))

        events = await follow(server.target, run_id, kill_listen_at_50)
        assert killed == [1]  # the server's one LISTEN connection
        assert_whole(events)
        # Nothing had to be run again: the owner never lost its store, only its ears.
        assert {e.attempt for e in events if e.HasField("text_delta")} == {1}
    finally:
        server.kill()
        await server.wait()
