"""Background tasks over gRPC on both backends: their events, limits, timeouts, retries,
until_idle, cancellation, late results on a thread, and the task RPCs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.agents.checkpoint import Checkpoint, Phase
from server.app import Keel
from tests.integration.conftest import (
    Collected,
    assert_contiguous,
    collect,
    payloads,
    script,
    text,
    text_of,
)
from tests.integration.test_streams import error_info
from tests.processes import ROOT

QUICK = {"tasks_retry_backoff_s": 0.02, "tasks_retry_backoff_max_s": 0.05}


def slow(key: str, duration_ms: int = 0, fail_times: int = 0, tool: str = "slow") -> dict[str, Any]:
    return {
        "tool": tool,
        "args": {"key": key, "duration_ms": duration_ms, "fail_times": fail_times},
    }


def task_updates(events: Sequence[pb.AgentEvent]) -> list[pb.TaskUpdate]:
    return [e.task for e in events if e.WhichOneof("payload") == "task"]


def statuses_of(events: Sequence[pb.AgentEvent], task_id: str) -> list[str]:
    return [
        pb.TaskStatus.Name(u.status).removeprefix("TASK_STATUS_")
        for u in task_updates(events)
        if u.task_id == task_id
    ]


def task_ids(events: Sequence[pb.AgentEvent]) -> list[str]:
    """The ids of the run's tasks, in the order the model called their tools."""
    ids = []
    for event in events:
        if event.WhichOneof("payload") == "tool_result" and event.tool_result.tool_name.startswith(
            "slow"
        ):
            ids.append(json.loads(event.tool_result.result_json)["task_id"])
    return ids


@pytest.fixture
async def tasks_stub(start_keel: Callable[..., Any]) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    keel: Keel = await start_keel(**QUICK)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        yield pb_grpc.AgentServiceStub(channel)


async def stream(
    stub: pb_grpc.AgentServiceStub, *steps: dict[str, Any], until_idle: bool = True, **kw: Any
) -> Collected:
    request = pb.StreamRequest(
        agent_id=kw.pop("agent_id", "scripted"), input=script(*steps), until_idle=until_idle, **kw
    )
    out = await collect(stub.Stream(request))
    assert_contiguous(out.events)
    return out


async def wait_for_text(
    stub: pb_grpc.AgentServiceStub, run_id: str, needle: str, timeout_s: float = 30
) -> None:
    """Follow the run until its text holds `needle`."""
    seen: list[pb.AgentEvent] = []
    async with asyncio.timeout(timeout_s):
        async for message in stub.Observe(pb.ObserveRequest(run_id=run_id)):
            if message.WhichOneof("kind") == "events":
                seen.extend(message.events.events)
                if needle in text_of(seen):
                    return
    raise AssertionError(f"the run ended without {needle!r} in its text")


async def wait_for_task(
    stub: pb_grpc.AgentServiceStub, task_id: str, *statuses: int, timeout_s: float = 20
) -> pb.Task:
    async with asyncio.timeout(timeout_s):
        while True:
            task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task
            if task.status in statuses:
                return task
            await asyncio.sleep(0.02)


@pytest.mark.executors
async def test_until_idle_gives_the_model_every_result_in_the_order_tasks_end(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await stream(
        tasks_stub, slow("a", 900), slow("b", 100), slow("c", 500), text(1), until_idle=True
    )
    assert len(out.snapshots) == 1 and {e.run_id for e in out.events} == {out.run_id}
    assert payloads(out.events)[-1] == "finish"
    a, b, c = task_ids(out.events)
    said = [e.text_delta.delta for e in out.events if e.WhichOneof("payload") == "text_delta"]
    answers = [d for d in said if d.startswith("got ")]
    # Started a, b, c; they end b, c, a unless a loaded machine starts one late: the
    # results come in the order the log says they completed, whatever that was.
    completed = [
        u.task_id for u in task_updates(out.events) if u.status == pb.TASK_STATUS_COMPLETED
    ]
    assert sorted(completed) == sorted((a, b, c))
    assert answers == [f"got [task {task_id}] slow completed: 1 " for task_id in completed], answers
    for task_id in (a, b, c):
        assert statuses_of(out.events, task_id) == [
            "QUEUED",
            "STARTED",
            "PROGRESS",
            "COMPLETED",
        ]
    # Every outcome reached the stream before the model's answer to it.
    kinds = [(e.index, e.task.status, e.task.task_id) for e in out.events if e.HasField("task")]
    completed_at = {t: i for i, s, t in kinds if s == pb.TASK_STATUS_COMPLETED}
    answered_at = {
        t: next(e.index for e in out.events if e.text_delta.delta.startswith(f"got [task {t}]"))
        for t in (a, b, c)
    }
    assert all(completed_at[t] < answered_at[t] for t in (a, b, c))
    assert out.events[-1].finish.output_text == "done"


async def test_without_until_idle_the_run_finishes_and_its_task_goes_on(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await stream(tasks_stub, slow("k", 400), text(1), until_idle=False)
    assert payloads(out.events)[-1] == "finish"
    [task_id] = task_ids(out.events)
    assert "COMPLETED" not in statuses_of(out.events, task_id)
    task = await wait_for_task(tasks_stub, task_id, pb.TASK_STATUS_COMPLETED)
    assert (task.result_json, task.attempt, task.tool_name, task.run_id) == (
        "1",
        1,
        "slow",
        out.run_id,
    )
    assert json.loads(task.args_json) == {"key": "k", "duration_ms": 400, "fail_times": 0}
    run = (await tasks_stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == pb.RUN_STATE_SUCCEEDED and run.next_offset == len(out.events)


async def test_failed_attempts_are_retried_then_succeed(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await stream(tasks_stub, slow("k", 50, fail_times=2))
    [task_id] = task_ids(out.events)
    assert statuses_of(out.events, task_id) == [
        "QUEUED",
        *(["STARTED", "PROGRESS", "RETRYING"] * 2),
        "STARTED",
        "PROGRESS",
        "COMPLETED",
    ]
    retries = [u for u in task_updates(out.events) if u.status == pb.TASK_STATUS_RETRYING]
    assert [u.attempt for u in retries] == [2, 3]  # the attempt to come
    assert "failed on purpose (attempt 1)" in retries[0].message
    task = (await tasks_stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task
    assert (task.status, task.attempt, task.max_retries) == (pb.TASK_STATUS_COMPLETED, 3, 3)
    assert f"got [task {task_id}] slow completed: 1 " in text_of(out.events)


async def test_a_task_whose_retries_run_out_fails_and_the_model_is_told(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await stream(tasks_stub, slow("k", 10, fail_times=10))
    [task_id] = task_ids(out.events)
    assert statuses_of(out.events, task_id).count("RETRYING") == 3
    assert statuses_of(out.events, task_id)[-1] == "FAILED"
    task = (await tasks_stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task
    assert (task.status, task.attempt) == (pb.TASK_STATUS_FAILED, 4)
    assert "failed on purpose (attempt 4)" in task.error
    assert f"got [task {task_id}] slow failed: " in text_of(out.events)


async def test_an_attempt_over_its_timeout_is_stopped_and_counts_as_a_failure(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(tasks_default_timeout_s=0.2, **QUICK)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        out = await stream(stub, slow("k", 5000))
        [task_id] = task_ids(out.events)
        task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task
        assert (task.status, task.attempt) == (pb.TASK_STATUS_FAILED, 4)
        assert task.error == "timed out after 0.2 s"
        assert task.timeout.ToMilliseconds() == 200
        assert await keel.log.get_counter(out.run_id, "k") == 0  # never finished its work
        assert await keel.log.get_counter(out.run_id, "attempts:k") == 4


async def test_reject_tells_the_model_the_system_is_busy_and_makes_no_task(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(tasks_global_concurrency=1, **QUICK)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        out = await stream(
            stub, slow("first", 1500), slow("second", 10, tool="slow_reject"), until_idle=False
        )
        results = [
            json.loads(e.tool_result.result_json)
            for e in out.events
            if e.WhichOneof("payload") == "tool_result"
        ]
        assert results[0]["status"] == "queued"
        assert results[1]["status"] == "rejected" and results[1]["task_id"] == ""
        assert "busy" in results[1]["message"]
        tasks = await stub.ListTasks(pb.ListTasksRequest(run_id=out.run_id))
        assert [t.tool_name for t in tasks.tasks] == ["slow"]
        # With the slot free again, the same tool makes a task.
        await wait_for_task(stub, results[0]["task_id"], pb.TASK_STATUS_COMPLETED)
        again = await stream(stub, slow("third", 10, tool="slow_reject"))
        assert statuses_of(again.events, task_ids(again.events)[0])[-1] == "COMPLETED"


async def test_queued_tasks_wait_for_a_slot_and_never_exceed_the_limits(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(
        agents="tests.registries:options", tasks_global_concurrency=2, **QUICK
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        many = await stream(stub, *(slow(f"k{n}", 200) for n in range(5)))
        one = await stream(
            stub, *(slow(f"j{n}", 100) for n in range(3)), agent_id="scripted-one-task"
        )

    def most_at_once(events: Sequence[pb.AgentEvent]) -> int:
        changes = sorted(
            (u.time.ToNanoseconds(), +1 if u.status == pb.TASK_STATUS_STARTED else -1)
            for u in task_updates(events)
            if u.status in (pb.TASK_STATUS_STARTED, pb.TASK_STATUS_COMPLETED)
        )
        running = peak = 0
        for _, change in changes:
            running += change
            peak = max(peak, running)
        return peak

    assert most_at_once(many.events) == 2  # the global limit
    assert most_at_once(one.events) == 1  # the agent's limit
    for task_id in task_ids(many.events):
        assert statuses_of(many.events, task_id)[:2] == ["QUEUED", "STARTED"]


@pytest.mark.executors
async def test_cancel_run_cancels_its_pending_tasks(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await tasks_stub.StartRun(
        pb.StartRunRequest(
            agent_id="scripted",
            input=script(slow("long", 20_000), slow("later", 20_000)),
            until_idle=True,
        )
    )
    run_id = started.run.run_id

    async def both_known() -> list[pb.Task]:
        async with asyncio.timeout(10):
            while True:
                tasks = (await tasks_stub.ListTasks(pb.ListTasksRequest(run_id=run_id))).tasks
                if len(tasks) == 2 and all(t.status == pb.TASK_STATUS_STARTED for t in tasks):
                    return list(tasks)
                await asyncio.sleep(0.02)

    tasks = await both_known()
    cancelled = await tasks_stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="enough"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    for task in tasks:
        ended = await wait_for_task(tasks_stub, task.task_id, pb.TASK_STATUS_CANCELLED)
        assert "enough" in ended.error


@pytest.mark.executors
async def test_cancel_task_and_retry_task(tasks_stub: pb_grpc.AgentServiceStub) -> None:
    started = await tasks_stub.StartRun(
        pb.StartRunRequest(
            agent_id="scripted",
            input=script(slow("k", 30_000), slow("keeps-the-run-open", 30_000)),
            until_idle=True,
        )
    )
    run_id = started.run.run_id
    async with asyncio.timeout(10):
        while (
            len(tasks := (await tasks_stub.ListTasks(pb.ListTasksRequest(run_id=run_id))).tasks) < 2
        ):
            await asyncio.sleep(0.02)
    by_call = {t.tool_call_id: t.task_id for t in tasks}
    task_id, keeper_id = by_call["call_0"], by_call["call_1"]
    await wait_for_task(tasks_stub, task_id, pb.TASK_STATUS_STARTED)
    with pytest.raises(grpc.aio.AioRpcError) as running:
        await tasks_stub.RetryTask(pb.RetryTaskRequest(task_id=task_id))
    assert running.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(running.value)
    assert (info.reason, info.metadata["status"]) == ("TASK_NOT_RETRYABLE", "running")

    await tasks_stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason="changed my mind"))
    cancelled = await wait_for_task(tasks_stub, task_id, pb.TASK_STATUS_CANCELLED)
    assert cancelled.error == "changed my mind"
    again = await tasks_stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason="twice"))
    assert again.task.error == "changed my mind"  # an ended task is left as it is
    # A task retried before the run took its outcome in would replace that outcome: the
    # model hears of a task's ending once the run has it (with Temporal, a moment later).
    await wait_for_text(tasks_stub, run_id, f"got [task {task_id}] slow cancelled")

    retried = await tasks_stub.RetryTask(pb.RetryTaskRequest(task_id=task_id))
    assert retried.task.status in (pb.TASK_STATUS_QUEUED, pb.TASK_STATUS_STARTED)
    await wait_for_task(tasks_stub, task_id, pb.TASK_STATUS_STARTED)
    await tasks_stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason="done testing"))
    await tasks_stub.CancelTask(pb.CancelTaskRequest(task_id=keeper_id, reason="done testing"))
    out = await collect(tasks_stub.Observe(pb.ObserveRequest(run_id=run_id)))
    assert statuses_of(out.events, task_id) == [
        "QUEUED",
        "STARTED",
        "CANCELLED",
        "QUEUED",
        "STARTED",
        "CANCELLED",
    ]
    # The run waited for the retried task, and the model heard of each ending.
    assert text_of(out.events).count(f"got [task {task_id}] slow cancelled") == 2
    assert payloads(out.events)[-1] == "finish"


async def test_a_late_result_joins_the_runs_thread_for_the_next_turn(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    thread = (await tasks_stub.CreateThread(pb.CreateThreadRequest())).thread
    out = await stream(
        tasks_stub, slow("k", 300), text(1), until_idle=False, thread_id=thread.thread_id
    )
    [task_id] = task_ids(out.events)
    await wait_for_task(tasks_stub, task_id, pb.TASK_STATUS_COMPLETED)
    page = await tasks_stub.ListThreadMessages(
        pb.ListThreadMessagesRequest(thread_id=thread.thread_id)
    )
    last = page.messages[-1]
    assert (last.kind, last.run_id) == (pb.MESSAGE_KIND_REQUEST, out.run_id)
    assert last.parts[0].user_prompt.text == f"[task {task_id}] slow completed: 1"
    # The next turn's history has it; it is not counted as a user's prompt.
    nxt = await stream(tasks_stub, {"echo_history": True}, thread_id=thread.thread_id)
    assert text_of(nxt.events) == "history=1 done"


async def test_task_rpcs_answer_bad_input_with_the_right_status(
    tasks_stub: pb_grpc.AgentServiceStub,
) -> None:
    unknown = "0123456789abcdef0123456789abcdef.0123456789abcdef"
    for call in (
        lambda: tasks_stub.GetTask(pb.GetTaskRequest(task_id=unknown)),
        lambda: tasks_stub.CancelTask(pb.CancelTaskRequest(task_id=unknown)),
        lambda: tasks_stub.RetryTask(pb.RetryTaskRequest(task_id=unknown)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call()
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(missing.value).reason == "TASK_NOT_FOUND"
    for bad in ("", "no-dot-here", "{x}.0123456789abcdef", "r" * 200):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await tasks_stub.GetTask(pb.GetTaskRequest(task_id=bad))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request in (
        pb.ListTasksRequest(statuses=[pb.TASK_STATUS_PROGRESS]),
        pb.ListTasksRequest(statuses=[99]),  # type: ignore[list-item]
        pb.ListTasksRequest(page_size=-1),
        pb.ListTasksRequest(run_id="{bad}"),
        pb.ListTasksRequest(page_token="garbage!"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await tasks_stub.ListTasks(request)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for _ in range(2):
        await stream(tasks_stub, slow("k", 0), until_idle=True)
    page = await tasks_stub.ListTasks(pb.ListTasksRequest(page_size=1))
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as other_filters:
        await tasks_stub.ListTasks(
            pb.ListTasksRequest(agent_id="scripted", page_token=page.next_page_token)
        )
    assert other_filters.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--tasks-global-concurrency", "-1"),
        ("--tasks-global-concurrency", "0"),
        ("--tasks-global-concurrency", "1000000000"),
    ],
)
def test_the_server_refuses_to_start_with_absurd_task_limits(flag: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", flag, value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "tasks_global_concurrency" in done.stderr
    for env, bad in (("KEEL_TASKS_DEFAULT_TIMEOUT_S", "-5"), ("KEEL_TASKS_RETRY_BACKOFF_S", "x")):
        refused = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--port", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**__import__("os").environ, env: bad},
        )
        assert refused.returncode != 0
        assert env.removeprefix("KEEL_").lower() in refused.stderr


async def test_checkpoints_taken_after_an_outcome_remember_it_was_given(
    start_keel: Callable[..., Any],
) -> None:
    # A run taken over from any checkpoint after the model got a task's outcome
    # must not give it again: every checkpoint carries the outcomes given so far.
    keel: Keel = await start_keel(**QUICK)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        out = await stream(stub, slow("a", 50), text(1), until_idle=True)
    [task_id] = task_ids(out.events)
    record = await keel.log.get_run(out.run_id)
    last = Checkpoint.decode(record.checkpoint)
    # The last checkpoint is the one taken in the model's answer to the outcome.
    assert last.phase is Phase.RESPONSE
    assert last.fed == (f"{task_id}@1",)
