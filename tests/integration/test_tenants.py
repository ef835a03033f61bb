"""Tenant isolation: on a server with API keys, each tenant sees only its own runs, threads,
tasks and schedules; another tenant's answers NOT_FOUND exactly as a missing one does,
and Lists never mix. Request ids are scoped per tenant."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from server.auth.keys import Role, add_key
from tests.integration.conftest import collect, script, text

SLOW = {"tool": "slow", "args": {"key": "t", "duration_ms": 30_000}}


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Tenant:
    """A stub whose every call carries one tenant's admin key."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self.stub = pb_grpc.AgentServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {key}"),)

    async def __call__(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=self.metadata)

    async def stream(self, method: str, request: Any) -> Any:
        return await collect(getattr(self.stub, method)(request, metadata=self.metadata))


async def not_found(call: Awaitable[Any]) -> str:
    """The details of the NOT_FOUND the call must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    return str(caught.value.details())


async def test_another_tenants_resources_are_missing_and_lists_never_mix(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.jsonl"
    a_key, b_key = add_key(keys, "tenant-a", Role.ADMIN), add_key(keys, "tenant-b", Role.ADMIN)
    keel: Keel = await start_keel(api_keys_file=str(keys), tasks_poll_interval_s=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        a, b = Tenant(channel, a_key), Tenant(channel, b_key)
        # Tenant A's resources: a thread, a run on it with a background task, a schedule.
        thread = (await a("CreateThread", pb.CreateThreadRequest())).thread
        run = (
            await a(
                "StartRun",
                pb.StartRunRequest(
                    agent_id="scripted",
                    input=script(SLOW, text(1)),
                    thread_id=thread.thread_id,
                    until_idle=True,
                ),
            )
        ).run
        for _ in range(500):
            tasks = (await a("ListTasks", pb.ListTasksRequest(run_id=run.run_id))).tasks
            if tasks:
                break
            await asyncio.sleep(0.02)
        [task] = tasks
        schedule = (
            await a(
                "CreateSchedule",
                pb.CreateScheduleRequest(
                    agent_id="scripted", cron="0 0 1 1 *", timezone="UTC", input=script(text(1))
                ),
            )
        ).schedule

        # Every RPC of B on A's ids answers as for ids that never existed.
        missing_run, missing_thread = uuid.uuid4().hex, uuid.uuid4().hex
        missing_schedule = uuid.uuid4().hex

        async def same(make: Callable[[str], Awaitable[Any]], theirs: str, nothing: str) -> None:
            seen, absent = await not_found(make(theirs)), await not_found(make(nothing))
            assert seen == absent.replace(nothing, theirs)

        decision = pb.Decision(tool_call_id="x", approve=pb.Approve())
        run_calls: list[Callable[[str], Awaitable[Any]]] = [
            lambda r: b("GetRun", pb.GetRunRequest(run_id=r)),
            lambda r: b("CancelRun", pb.CancelRunRequest(run_id=r)),
            lambda r: b.stream("Observe", pb.ObserveRequest(run_id=r)),
            lambda r: b.stream("Resume", pb.ResumeRequest(run_id=r, decisions=[decision])),
        ]
        for make in run_calls:
            await same(make, run.run_id, missing_run)
        thread_calls: list[Callable[[str], Awaitable[Any]]] = [
            lambda t: b("GetThread", pb.GetThreadRequest(thread_id=t)),
            lambda t: b("DeleteThread", pb.DeleteThreadRequest(thread_id=t)),
            lambda t: b("ListThreadMessages", pb.ListThreadMessagesRequest(thread_id=t)),
            lambda t: b(
                "StartRun",
                pb.StartRunRequest(agent_id="scripted", input=script(text(1)), thread_id=t),
            ),
        ]
        for make in thread_calls:
            await same(make, thread.thread_id, missing_thread)
        task_calls: list[Callable[[str], Awaitable[Any]]] = [
            lambda t: b("GetTask", pb.GetTaskRequest(task_id=t)),
            lambda t: b("CancelTask", pb.CancelTaskRequest(task_id=t)),
            lambda t: b("RetryTask", pb.RetryTaskRequest(task_id=t)),
        ]
        for make in task_calls:
            await not_found(make(task.task_id))
        schedule_calls: list[Callable[[str], Awaitable[Any]]] = [
            lambda s: b("GetSchedule", pb.GetScheduleRequest(schedule_id=s)),
            lambda s: b("DeleteSchedule", pb.DeleteScheduleRequest(schedule_id=s)),
            lambda s: b("TriggerSchedule", pb.TriggerScheduleRequest(schedule_id=s)),
            lambda s: b("ListScheduleRuns", pb.ListScheduleRunsRequest(schedule_id=s)),
            lambda s: b(
                "UpdateSchedule",
                pb.UpdateScheduleRequest(
                    schedule=pb.Schedule(schedule_id=s, paused=True),
                    update_mask={"paths": ["paused"]},
                ),
            ),
        ]
        for make in schedule_calls:
            await same(make, schedule.schedule_id, missing_schedule)

        # Lists: A sees its own, B none of A's.
        lists = [
            ("ListRuns", pb.ListRunsRequest(), "runs", "run_id", run.run_id),
            ("ListThreads", pb.ListThreadsRequest(), "threads", "thread_id", thread.thread_id),
            ("ListTasks", pb.ListTasksRequest(), "tasks", "task_id", task.task_id),
            (
                "ListSchedules",
                pb.ListSchedulesRequest(),
                "schedules",
                "schedule_id",
                schedule.schedule_id,
            ),
        ]
        for method, request, field, key, own in lists:
            mine = [getattr(x, key) for x in getattr(await a(method, request), field)]
            theirs = [getattr(x, key) for x in getattr(await b(method, request), field)]
            assert own in mine and own not in theirs, method
        assert not (await b("ListRuns", pb.ListRunsRequest(thread_id=thread.thread_id))).runs

        # A's own calls still work, and its run goes on (B's cancel did nothing).
        assert (await a("GetRun", pb.GetRunRequest(run_id=run.run_id))).run.state in (
            pb.RUN_STATE_RUNNING,
            pb.RUN_STATE_QUEUED,
        )
        await a("CancelRun", pb.CancelRunRequest(run_id=run.run_id))


async def test_request_ids_are_scoped_per_tenant(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.jsonl"
    a_key, b_key = add_key(keys, "tenant-a", Role.RUNNER), add_key(keys, "tenant-b", Role.RUNNER)
    keel: Keel = await start_keel(api_keys_file=str(keys))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        a, b = Tenant(channel, a_key), Tenant(channel, b_key)
        request = pb.StartRunRequest(agent_id="scripted", input=script(text(1)), request_id="r-1")
        run_a, run_b = (await a("StartRun", request)).run, (await b("StartRun", request)).run
        assert run_a.run_id != run_b.run_id
        assert (await a("StartRun", request)).run.run_id == run_a.run_id  # still idempotent
        other = pb.StartRunRequest(agent_id="scripted", input=script(text(2)), request_id="r-1")
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await a("StartRun", other)
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        threads = pb.CreateThreadRequest(request_id="t-1")
        thread_a, thread_b = (
            (await a("CreateThread", threads)).thread,
            (await b("CreateThread", threads)).thread,
        )
        assert thread_a.thread_id != thread_b.thread_id


async def test_an_admin_lists_another_tenant_only_by_naming_it(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.jsonl"
    a_runner = add_key(keys, "tenant-a", Role.RUNNER)
    b_runner, b_admin = (
        add_key(keys, "tenant-b", Role.RUNNER),
        add_key(keys, "tenant-b", Role.ADMIN),
    )
    keel: Keel = await start_keel(api_keys_file=str(keys))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        a, b, admin = Tenant(channel, a_runner), Tenant(channel, b_runner), Tenant(channel, b_admin)
        started = pb.StartRunRequest(agent_id="scripted", input=script(text(1)))
        run_a = (await a("StartRun", started)).run.run_id
        run_b = (await b("StartRun", started)).run.run_id

        async def listed(who: Tenant, tenant: str) -> set[str]:
            return {
                r.run_id for r in (await who("ListRuns", pb.ListRunsRequest(tenant=tenant))).runs
            }

        assert await listed(admin, "") == {run_b}  # its own tenant, by default
        assert await listed(admin, "tenant-a") == {run_a}
        assert await listed(admin, "*") == {run_a, run_b}
        assert await listed(b, "tenant-b") == {run_b}  # naming its own tenant is fine
        for method, request in (
            ("ListRuns", pb.ListRunsRequest(tenant="tenant-a")),
            ("ListThreads", pb.ListThreadsRequest(tenant="tenant-a")),
            ("ListTasks", pb.ListTasksRequest(tenant="*")),
            ("ListSchedules", pb.ListSchedulesRequest(tenant="tenant-a")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await b(method, request)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        # By id, even an admin sees only its own tenant's.
        await not_found(admin("GetRun", pb.GetRunRequest(run_id=run_a)))
