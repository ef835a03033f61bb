"""The Temporal executor: who executes runs, its workflows, and what it does with bad input
(Temporal down, a worker without the agent, no Redis). The API behaviour it shares with
the local executor is proven by the tests marked `executors`, which run on both."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from temporalio.client import Client, WorkflowExecutionStatus

from server.app import Keel, create_server
from server.events.redis import RedisEventLog
from server.settings import Settings
from server.temporal.workflow import workflow_id
from tests.integration.conftest import collect, payloads, record, script, text
from tests.temporal import ROOT, WorkerProcess, free_port, start_temporal, start_worker

T = TypeVar("T")
APPROVE = {"tool": "approve_me", "args": {"action": "deploy"}}


def temporal_settings(
    redis_url: str, temporal_address: str, key_prefix: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "port": 0,
        "agents": "server.agents.testing:registry",
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "executor": "temporal",
        "temporal_address": temporal_address,
        "task_queue": f"queue-{key_prefix}",
        "temporal_heartbeat_timeout_s": 10.0,  # no test here kills a worker
        "sweep_interval_s": 0.2,
        "lease_ttl_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def worker_for(settings: Settings, agents: str = "") -> WorkerProcess:
    return start_worker(
        temporal_address=settings.temporal_address,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        task_queue=settings.task_queue,
        agents=agents or settings.agents,
        env={
            "KEEL_LEASE_TTL_S": str(settings.lease_ttl_s),
            "KEEL_TEMPORAL_HALF_STEPS": str(settings.temporal_half_steps).lower(),
        },
    )


def error_reason(exc: grpc.aio.AioRpcError) -> tuple[str, float]:
    """The ErrorInfo reason and the RetryInfo delay (s) of an error."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    reason, delay_s = "", -1.0
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay_s = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay_s


async def retry_unavailable(call: Callable[[], Awaitable[T]], timeout_s: float = 60) -> T:
    """`call()` until it answers anything but UNAVAILABLE (a bound, not a timing goal)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.2)


class Launch:
    """API servers (in this process) and workers of one test; stopped at its end."""

    def __init__(self) -> None:
        self.servers: list[Keel] = []
        self.channels: list[grpc.aio.Channel] = []
        self.workers: list[WorkerProcess] = []

    async def server(self, settings: Settings) -> tuple[Keel, pb_grpc.AgentServiceStub]:
        keel = await create_server(settings)
        self.servers.append(keel)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}")
        self.channels.append(channel)
        return keel, pb_grpc.AgentServiceStub(channel)

    def worker(self, settings: Settings, agents: str = "") -> WorkerProcess:
        worker = worker_for(settings, agents)
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        """Stop everything; safe to call more than once."""
        for worker in self.workers:
            worker.kill()
        for channel in self.channels:
            await channel.close()
        servers, self.servers, self.channels = self.servers, [], []
        for keel in servers:
            try:
                async with asyncio.timeout(30):
                    await keel.stop(grace_s=0)
            except TimeoutError:
                for task in asyncio.all_tasks():  # say what the stop waited for
                    task.print_stack(file=sys.stderr)
                raise


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    launched = Launch()
    try:
        yield launched
    finally:
        await launched.stop()


async def test_runs_execute_on_a_worker_as_workflows_keyed_by_request_id(
    launch: Launch, redis_url: str, temporal_address: str, key_prefix: str
) -> None:
    settings = temporal_settings(redis_url, temporal_address, key_prefix)
    _, stub = await launch.server(settings)
    launch.worker(settings)
    request = pb.StreamRequest(
        agent_id="scripted", input=script(text(5), record("k")), request_id="order-7"
    )
    first = await collect(stub.Stream(request))
    again = await collect(stub.Stream(request))  # attaches to the same run and workflow
    assert first.run_id == again.run_id
    assert payloads(first.events)[-1] == payloads(again.events)[-1] == "finish"
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    try:
        executed = await log.get_run(first.run_id)
        assert executed.owner and executed.owner != settings.instance_id  # the worker's
        assert await log.get_counter(first.run_id, "k") == 1
    finally:
        await log.close()
    client = await Client.connect(temporal_address)
    handle = client.get_workflow_handle(workflow_id(first.run_id))
    assert await handle.result() == "succeeded"
    described = await handle.describe()
    assert described.status is WorkflowExecutionStatus.COMPLETED
    assert described.task_queue == settings.task_queue


@pytest.mark.parametrize(
    ("half_steps", "activities"),
    [
        # response 1, its tools, response 2, its tools, the final response and finish
        (True, ["keel.model_request", "keel.tool_calls"] * 2 + ["keel.model_request"]),
        (False, ["keel.model_request"]),  # one activity runs the run to its end
    ],
)
async def test_model_requests_and_tool_calls_are_activities_unless_configured_otherwise(
    launch: Launch,
    redis_url: str,
    temporal_address: str,
    key_prefix: str,
    half_steps: bool,
    activities: list[str],
) -> None:
    settings = temporal_settings(
        redis_url, temporal_address, key_prefix, temporal_half_steps=half_steps
    )
    _, stub = await launch.server(settings)
    launch.worker(settings)
    steps = script(text(2), record("a"), record("b"), text(1))
    out = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=steps)))
    assert [e.index for e in out.events] == list(range(len(out.events)))
    assert payloads(out.events)[-1] == "finish" and "step_superseded" not in payloads(out.events)
    client = await Client.connect(temporal_address)
    handle = client.get_workflow_handle(workflow_id(out.run_id))
    await handle.result()
    history = await handle.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled == activities


async def test_a_live_only_run_streams_every_event_from_its_first(
    launch: Launch, redis_url: str, temporal_address: str, key_prefix: str
) -> None:
    """A live-only run keeps no events: its workflow starts once the Stream listens."""
    settings = temporal_settings(
        redis_url, temporal_address, key_prefix, agents="tests.registries:options"
    )
    _, stub = await launch.server(settings)
    launch.worker(settings)
    request = pb.StreamRequest(agent_id="scripted-live", input=script(text(20), record("k")))
    out = await collect(stub.Stream(request))
    assert [e.index for e in out.events] == list(range(len(out.events)))
    assert payloads(out.events)[0] == "start" and payloads(out.events)[-1] == "finish"


async def test_a_cancelled_run_ends_its_workflow_cancelled(
    launch: Launch, redis_url: str, temporal_address: str, key_prefix: str
) -> None:
    settings = temporal_settings(redis_url, temporal_address, key_prefix)
    _, stub = await launch.server(settings)
    launch.worker(settings)
    started = await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=script(APPROVE)))
    run_id = started.run.run_id
    await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, stop_at_suspend=True)))
    cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="changed my mind"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    client = await Client.connect(temporal_address)
    handle = client.get_workflow_handle(workflow_id(run_id))
    for _ in range(200):
        described = await handle.describe()
        if described.status is not WorkflowExecutionStatus.RUNNING:
            break
        await asyncio.sleep(0.05)
    assert described.status is WorkflowExecutionStatus.CANCELED


async def test_a_server_whose_temporal_is_down_answers_unavailable_and_recovers(
    launch: Launch, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    settings = temporal_settings(redis_url, f"127.0.0.1:{port}", key_prefix)
    _, stub = await launch.server(settings)  # starts although Temporal is down
    assert [a.agent_id for a in (await stub.ListAgents(pb.ListAgentsRequest())).agents]
    request = pb.StartRunRequest(agent_id="scripted", input=script(text(3)), request_id="r-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartRun(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reason, delay_s = error_reason(caught.value)
    assert reason == "ENGINE_UNAVAILABLE" and delay_s > 0
    # A run started without a request_id while Temporal is down is not lost either.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=script(text(2))))
    orphans = (await stub.ListRuns(pb.ListRunsRequest())).runs

    temporal = start_temporal(tmp_path, port)
    try:  # the server and worker stop before Temporal does (the launch's stop, below)
        launch.worker(settings)
        # The client retries, as RetryInfo says, until Temporal is ready; the retry
        # attaches to the stored run.
        started = await retry_unavailable(lambda: stub.StartRun(request))
        done = await collect(stub.Observe(pb.ObserveRequest(run_id=started.run.run_id)))
        assert payloads(done.events)[-1] == "finish"
        for orphan in orphans:  # the sweep starts the workflows that could not start
            out = await collect(stub.Observe(pb.ObserveRequest(run_id=orphan.run_id)))
            assert payloads(out.events)[-1] == "finish"
    finally:
        await launch.stop()
        temporal.stop()


async def test_a_worker_without_the_agent_fails_the_run_with_an_error_event(
    launch: Launch, redis_url: str, temporal_address: str, key_prefix: str
) -> None:
    settings = temporal_settings(redis_url, temporal_address, key_prefix)
    _, stub = await launch.server(settings)
    launch.worker(settings, agents="tests.registries:judge_only")
    out = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(2)))))
    error = out.events[-1]
    assert error.WhichOneof("payload") == "error"
    assert "scripted" in error.error.message
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == pb.RUN_STATE_FAILED


def test_serve_refuses_the_temporal_executor_without_redis() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--executor", "temporal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "needs Redis" in done.stderr and "--redis-url" in done.stderr


async def test_create_server_refuses_the_temporal_executor_without_redis() -> None:
    with pytest.raises(Exception, match="needs Redis"):
        await create_server(Settings(port=0, executor="temporal"))
