"""The server around the service: reflection, health, settings, cross-instance cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient
from prometheus_client import REGISTRY

from server.app import SERVICE_NAME as SERVICE
from server.app import Keel, server_options
from server.settings import Settings
from tests.integration.conftest import assert_contiguous, collect, payloads, script, text
from tests.integration.test_streams import error_info


async def test_reflection_lists_agent_service_and_health(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert {"keel.v1.AgentService", "grpc.health.v1.Health"} <= names
        break


def test_settings_come_from_keel_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_PORT", "6123")
    monkeypatch.setenv("KEEL_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("KEEL_OBSERVER_QUEUE_SIZE", "7")
    settings = Settings(agents="x:y")  # flags (keyword arguments) win over the environment
    assert (settings.port, settings.redis_url, settings.observer_queue_size) == (
        6123,
        "redis://127.0.0.1:1/0",
        7,
    )
    assert settings.agents == "x:y"
    monkeypatch.setenv("KEEL_OBSERVER_QUEUE_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


@pytest.fixture
def backend() -> str:
    return "redis"


async def test_cancel_through_another_instance_stops_the_run(start_keel: Any) -> None:
    owner: Keel = await start_keel()
    other: Keel = await start_keel()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{owner.port}") as owner_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as other_channel,
    ):
        on_owner = pb_grpc.AgentServiceStub(owner_channel)
        on_other = pb_grpc.AgentServiceStub(other_channel)
        started = await on_owner.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(2000, delay_ms=5)))
        )
        run_id = started.run.run_id
        watching = asyncio.create_task(collect(on_other.Observe(pb.ObserveRequest(run_id=run_id))))
        while (await on_other.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 10:
            await asyncio.sleep(0.01)
        cancelled = await on_other.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="stop"))
        assert cancelled.run.state == pb.RUN_STATE_CANCELLED
        out = await watching
        assert payloads(out.events)[-1] == "abort"
        assert_contiguous(out.events)
        async with asyncio.timeout(10):  # the owner's next append is refused: it stops
            while owner.executor.running:
                await asyncio.sleep(0.01)
        final = (await on_owner.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert final.state == pb.RUN_STATE_CANCELLED
        assert final.next_offset == len(out.events)


async def test_an_unreachable_store_is_unavailable_with_retry_info_and_runs_stop_cleanly(
    start_keel: Any, disposable_redis: Any
) -> None:
    keel: Keel = await start_keel(redis_url=disposable_redis.url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(1000, delay_ms=5)))
        )
        run_id = started.run.run_id
        while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 5:
            await asyncio.sleep(0.01)
        disposable_redis.stop()  # the outage
        for call in (
            lambda: stub.GetRun(pb.GetRunRequest(run_id=run_id)),
            lambda: collect(stub.Observe(pb.ObserveRequest(run_id=run_id))),
            lambda: stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=script(text(1)))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
            assert status is not None
            kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
            assert {"ErrorInfo", "RetryInfo"} <= kinds
            assert error_info(err.value).reason == "STORE_UNAVAILABLE"
        # The run is not failed for the store's outage: its task stops, leaving
        # the run for whoever owns it once the store is back.
        async with asyncio.timeout(30):
            while keel.executor.running:
                await asyncio.sleep(0.05)


async def test_health_is_not_serving_while_the_store_is_unreachable(
    start_keel: Any, disposable_redis: Any
) -> None:
    keel: Keel = await start_keel(redis_url=disposable_redis.url, health_check_interval_s=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str = "") -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return int((await health.Check(request)).status)

        async def until(wanted: int) -> None:
            async with asyncio.timeout(30):
                while await status() != wanted or await status(SERVICE) != wanted:
                    await asyncio.sleep(0.02)

        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert await status() == serving
        disposable_redis.stop()
        await until(not_serving)
        disposable_redis.restart()
        await until(serving)
        # And the service works again on the restarted (empty) store.
        stub = pb_grpc.AgentServiceStub(channel)
        out = await collect(
            stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(3))))
        )
        assert payloads(out.events)[-1] == "finish"


def test_connection_settings_become_grpc_server_options() -> None:
    settings = Settings(
        grpc_keepalive_time_s=30,
        grpc_keepalive_timeout_s=5,
        grpc_max_connection_age_s=600,
        grpc_max_connection_age_grace_s=60,
        grpc_max_concurrent_streams=500,
        grpc_max_receive_message_bytes=8 << 20,
    )
    options = dict(server_options(settings))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.max_concurrent_streams"] == 500
    assert options["grpc.max_receive_message_length"] == 8 << 20
    assert "grpc.max_connection_age_ms" not in dict(server_options(Settings()))


async def test_a_stream_outlives_max_connection_age_by_resuming_on_a_new_connection(
    start_keel: Any,
) -> None:
    """With a short max connection age the server closes the connection under a long
    stream (GOAWAY, then the grace): the client wrapper resumes it at the next offset."""
    keel: Keel = await start_keel(
        grpc_max_connection_age_s=0.5, grpc_max_connection_age_grace_s=0.2
    )
    async with KeelClient(
        f"127.0.0.1:{keel.port}", initial_backoff_s=0.02, max_backoff_s=0.2, max_reconnects=100
    ) as client:
        handle = client.stream("scripted", script(text(150, delay_ms=10)))
        events = [event async for event in handle.events()]
    assert handle.reconnects, "the connection was never recycled"
    assert_contiguous(events)
    assert payloads(events)[-1] == "finish"


async def test_resume_outcomes_and_rpc_codes_are_counted(channel: grpc.aio.Channel) -> None:
    """In-process counters (this test's deltas): Resume by outcome, RPCs by code."""

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = sample("keel_resumes_total", outcome="OK")
    before_bad = sample("keel_resumes_total", outcome="NOT_FOUND")
    before_get = sample("keel_rpc_duration_seconds_count", method="GetRun", code="NOT_FOUND")
    stub = pb_grpc.AgentServiceStub(channel)
    approve = {"tool": "approve_me", "args": {}}
    started = await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=script(approve)))
    run_id = started.run.run_id
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, stop_at_suspend=True)))
    call_id = out.events[-2].tool_call_approval.tool_call_id
    decision = pb.Decision(tool_call_id=call_id, approve=pb.Approve())
    await collect(stub.Resume(pb.ResumeRequest(run_id=run_id, decisions=[decision])))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub.Resume(pb.ResumeRequest(run_id="f" * 32, decisions=[decision])))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetRun(pb.GetRunRequest(run_id="f" * 32))
    assert sample("keel_resumes_total", outcome="OK") == before_ok + 1
    assert sample("keel_resumes_total", outcome="NOT_FOUND") == before_bad + 1
    assert (
        sample("keel_rpc_duration_seconds_count", method="GetRun", code="NOT_FOUND")
        == before_get + 1
    )
