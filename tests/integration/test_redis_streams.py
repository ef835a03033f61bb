"""Redis-only stream behaviour: the live path failing under observers, and a graceful restart."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient

from tests.integration.conftest import (
    assert_contiguous,
    collect,
    payloads,
    record,
    script,
    text,
    text_of,
)
from tests.processes import start_keel_process


@pytest.fixture
def backend() -> str:
    return "redis"


async def test_observers_recover_from_the_log_when_pubsub_connection_is_killed(
    stub: pb_grpc.AgentServiceStub, redis_url: str
) -> None:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(300, delay_ms=3)))
    )
    run_id = started.run.run_id
    observers = [
        asyncio.create_task(collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0))))
        for _ in range(5)
    ]
    while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 50:
        await asyncio.sleep(0.01)
    admin = aioredis.from_url(redis_url)
    try:
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1  # the server's one pub/sub connection really went away
    finally:
        await admin.aclose()
    results = await asyncio.gather(*observers)
    for result in results:
        assert_contiguous(result.events)
        assert payloads(result.events)[-1] == "finish"
    assert len({len(r.events) for r in results}) == 1


async def test_graceful_restart_client_resumes_on_second_server_and_sees_every_event_once(
    redis_url: str, key_prefix: str
) -> None:
    """SIGTERM the server a wrapper streams from: the wrapper resumes on another process."""
    env = {"KEEL_SHUTDOWN_GRACE_S": "30", "KEEL_HEARTBEAT_INTERVAL_S": "0.2"}
    a = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, env=env)
    b = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, env=env)
    try:
        # One channel over both addresses: pick_first uses A, and B once A is gone.
        target = f"ipv4:{a.target},{b.target}"
        async with KeelClient(target, initial_backoff_s=0.02, max_backoff_s=0.5) as client:
            handle = client.stream("scripted", script(text(150, delay_ms=10), record("k")))
            events = []
            async for event in handle.events():
                events.append(event)
                if len(events) == 40:
                    a.terminate()
            assert handle.reconnects, "the stream never moved to the second server"
            assert all(r.rpc == "Observe" for r in handle.reconnects)
            assert_contiguous(events)
            assert payloads(events)[-1] == "finish"
            assert text_of(events).startswith("".join(f"t{i} " for i in range(150)))
            assert await a.wait() == 0  # A drained: it finished the run, then exited
            assert handle.run_id is not None
            run = await client.get_run(handle.run_id)  # answered by B
            assert run.state == pb.RUN_STATE_SUCCEEDED and run.next_offset == len(events)
    finally:
        for process in (a, b):
            process.kill()
            await process.wait()
