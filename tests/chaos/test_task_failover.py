"""Background tasks across Keel processes on one store: one global limit for all of
them, and a task (or a waiting run) that survives SIGKILL of the server running it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.agents.checkpoint import Checkpoint, Phase
from server.events.log import EventLog
from server.tasks.factory import task_store_for
from server.tasks.records import TaskStatus
from tests.chaos.conftest import (
    Cluster,
    effective_events,
    kinds,
    observe_all,
    script,
    text_of,
    wait_for,
)


def slow(key: str, duration_ms: int) -> dict[str, Any]:
    return {"tool": "slow", "args": {"key": key, "duration_ms": duration_ms}}


def updates(events: Sequence[pb.AgentEvent]) -> list[pb.TaskUpdate]:
    return [e.task for e in events if e.WhichOneof("payload") == "task"]


def peak_running(events: Sequence[pb.AgentEvent]) -> int:
    """The most attempts running at once, from the times of the tasks' changes."""
    ends = (pb.TASK_STATUS_COMPLETED, pb.TASK_STATUS_FAILED, pb.TASK_STATUS_RETRYING)
    changes = sorted(
        (u.time.ToNanoseconds(), +1 if u.status == pb.TASK_STATUS_STARTED else -1)
        for u in updates(events)
        if u.status == pb.TASK_STATUS_STARTED or u.status in ends
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


async def start_run(target: str, *steps: dict[str, Any]) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        started = await pb_grpc.AgentServiceStub(channel).StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(*steps), until_idle=True)
        )
    return started.run.run_id


async def test_ten_tasks_on_two_servers_never_run_more_than_the_global_limit(
    cluster: Cluster, store: EventLog
) -> None:
    limit = {"KEEL_TASKS_GLOBAL_CONCURRENCY": "3"}
    first = await cluster.start(KEEL_INSTANCE_ID="first", **limit)
    second = await cluster.start(KEEL_INSTANCE_ID="second", **limit)
    runs = await asyncio.gather(
        start_run(first.target, *(slow(f"a{n}", 400) for n in range(5))),
        start_run(second.target, *(slow(f"b{n}", 400) for n in range(5))),
    )
    streams = await asyncio.gather(*(observe_all(first.target, run_id) for run_id in runs))
    everything = [event for events in streams for event in events]
    assert all(kinds(events)[-1] == "finish" for events in streams)
    completed = [u for u in updates(everything) if u.status == pb.TASK_STATUS_COMPLETED]
    assert len({u.task_id for u in completed}) == 10
    assert peak_running(everything) == 3


async def test_a_task_survives_sigkill_of_its_server_and_completes_once(
    cluster: Cluster, store: EventLog
) -> None:
    first = await cluster.start(KEEL_INSTANCE_ID="first")
    second = await cluster.start(KEEL_INSTANCE_ID="second")
    processes = {"first": first, "second": second}
    run_id = await start_run(first.target, slow("k", 3000), {"text": 1})
    tasks = task_store_for(store, lease_ttl_s=1.5)

    async def running() -> bool:
        # Running, and its tool has begun (it counts its attempts first).
        found = await tasks.run_tasks(run_id)
        begun = await store.get_counter(run_id, "attempts:k") == 1
        return bool(found) and found[0].status is TaskStatus.RUNNING and begun

    await wait_for(running, what="the task's tool to start")
    [task] = await tasks.run_tasks(run_id)
    doomed = processes[task.owner]
    survivor = second if doomed is first else first
    doomed.kill()
    await doomed.wait()

    events = await observe_all(survivor.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events)[-1] == "finish"
    effective = effective_events(events)
    mine = [u for u in updates(effective) if u.task_id == task.task_id]
    assert [u.status for u in mine].count(pb.TASK_STATUS_COMPLETED) == 1
    assert [u.status for u in updates(events)].count(pb.TASK_STATUS_COMPLETED) == 1
    [ended] = await tasks.run_tasks(run_id)
    assert (ended.status, ended.attempt) == (TaskStatus.COMPLETED, 2)
    assert ended.owner != task.owner  # the other server ran it again
    assert await store.get_counter(run_id, "attempts:k") == 2  # at least once: twice here
    assert await store.get_counter(run_id, "k") == 1  # its effect, keyed by the task id: once
    assert text_of(effective).count(f"got [task {task.task_id}] slow completed: 1 ") == 1


async def test_a_run_waiting_for_its_tasks_survives_sigkill_of_its_owner(
    cluster: Cluster, store: EventLog
) -> None:
    first = await cluster.start(KEEL_INSTANCE_ID="first")
    second = await cluster.start(KEEL_INSTANCE_ID="second")
    processes = {"first": first, "second": second}
    run_id = await start_run(first.target, slow("k", 2500), {"text": 2})

    async def waiting() -> bool:
        record = await store.get_run(run_id)
        return bool(record.checkpoint) and Checkpoint.decode(record.checkpoint).phase is (
            Phase.WAITING
        )

    await wait_for(waiting, what="the run to wait for its task")
    owner = (await store.get_run(run_id)).owner
    doomed = processes[owner]
    survivor = second if doomed is first else first
    doomed.kill()
    await doomed.wait()

    events = await observe_all(survivor.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events)[-1] == "finish"
    effective = effective_events(events)
    [task_id] = {
        json.loads(e.tool_result.result_json)["task_id"]
        for e in effective
        if e.WhichOneof("payload") == "tool_result"
    }
    assert text_of(effective) == f"t0 t1 donegot [task {task_id}] slow completed: 1 done"
    record = await store.get_run(run_id)
    assert record.owner != owner and record.epoch >= 2
