"""keel_client's background tasks against a real Keel server, both backends.

The scripted agent's `slow` tool is a background tool: its call makes a task
that runs off the agent loop (it sleeps duration_ms, reports progress 0.5
halfway, fails its first fail_times attempts, then returns a count). The
run's stream carries the task's TaskUpdates; with until_idle the run waits
for the task and gives its result to the model ("got [task <id>] slow
completed: 1 "). The blocking client's helpers run in a thread of their own
(`blocking`, as in test_client_sync.py) while the test's loop serves.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient
from keel_client import sync as blocking_client

from server.app import Keel
from tests.integration.conftest import assert_contiguous, payloads, script, text, text_of
from tests.integration.test_client_sync import blocking
from tests.integration.test_client_threads import error_info

FAST: dict[str, Any] = {"initial_backoff_s": 0.02, "max_backoff_s": 0.5, "max_reconnects": 20}
RETRY_BACKOFF_S = 0.05  # the server's wait before a failed attempt is tried again
LONG_MS = 20_000  # a task that runs until it is cancelled, as far as a test is concerned
UNKNOWN_TASK = "0123456789abcdef0123456789abcdef.0123456789abcdef"
WAIT_S = 15.0
ENDED = (pb.TASK_STATUS_COMPLETED, pb.TASK_STATUS_FAILED, pb.TASK_STATUS_CANCELLED)


def slow(key: str, duration_ms: int, fail_times: int = 0) -> dict[str, Any]:
    return {
        "tool": "slow",
        "args": {"key": key, "duration_ms": duration_ms, "fail_times": fail_times},
    }


def task_updates(events: Sequence[pb.AgentEvent]) -> list[pb.TaskUpdate]:
    return [e.task for e in events if e.WhichOneof("payload") == "task"]


def statuses(updates: Sequence[pb.TaskUpdate]) -> list[str]:
    return [pb.TaskStatus.Name(u.status).removeprefix("TASK_STATUS_") for u in updates]


def assert_task_id_of(task_id: str, run_id: str) -> None:
    """A task's id is its run's id, a dot, and 16 hex digits."""
    assert re.fullmatch(re.escape(run_id) + r"\.[0-9a-f]{16}", task_id), (task_id, run_id)


def assert_until_idle_run(events: Sequence[pb.AgentEvent], run_id: str) -> pb.TaskUpdate:
    """The events of a run with until_idle whose one `slow` task failed once, then completed:
    the task's whole life before the model's last step, its result given to the model.

    Returns the COMPLETED update.
    """
    assert_contiguous(events)
    assert payloads(events)[0] == "start" and payloads(events)[-1] == "finish"
    updates = task_updates(events)
    assert statuses(updates) == [
        "QUEUED",
        "STARTED",
        "PROGRESS",
        "RETRYING",
        "STARTED",
        "PROGRESS",
        "COMPLETED",
    ], updates
    # QUEUED has no attempt yet; RETRYING names the attempt to come.
    assert [u.attempt for u in updates] == [0, 1, 1, 2, 2, 2, 2], updates
    task_id = updates[0].task_id
    assert_task_id_of(task_id, run_id)
    assert {u.task_id for u in updates} == {task_id}
    assert {u.name for u in updates} == {"slow"}
    assert updates[2].progress == pytest.approx(0.5) and updates[2].message == "halfway"
    assert "failed on purpose (attempt 1)" in updates[3].message
    completed = updates[-1]
    assert completed.result_json == "1"

    # The tool call came first; its immediate result names the task.
    kinds = payloads(events)
    call = events[kinds.index("tool_call")].tool_call
    assert call.tool_name == "slow" and completed.tool_call_id == call.tool_call_id
    assert kinds.index("tool_call") < kinds.index("task")
    result = json.loads(events[kinds.index("tool_result")].tool_result.result_json)
    assert result["task_id"] == task_id and result["status"] == "queued"
    # Every update came before the model was told the outcome, and that before `finish`.
    told = f"got [task {task_id}] slow completed: 1 "
    told_at = next(e.index for e in events if e.text_delta.delta == told)
    assert max(e.index for e in events if e.WhichOneof("payload") == "task") < told_at
    assert text_of(events).endswith(told + "done")
    return completed


def assert_completed_task(task: pb.Task, run_id: str, task_id: str) -> None:
    assert task.task_id == task_id and task.run_id == run_id
    assert task.agent_id == "scripted" and task.tool_name == "slow"
    assert task.status == pb.TASK_STATUS_COMPLETED, task
    assert task.attempt == 2 and task.max_retries == 3
    assert task.result_json == "1" and task.error == ""
    assert '"key"' in task.args_json and task.create_time.ToNanoseconds() > 0


def assert_code(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == code, error
    assert error_info(error).reason == reason


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        if result := await check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def eventually_sync(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll `check` (blocking) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
async def keel(start_keel: Callable[..., Any]) -> Keel:
    server: Keel = await start_keel(tasks_retry_backoff_s=RETRY_BACKOFF_S)
    return server


# The asyncio client.


async def test_until_idle_run_streams_its_task_and_gives_its_result_to_the_model(
    keel: Keel,
) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        handle = client.stream(
            "scripted", script(slow("a", 200, fail_times=1), text(1)), until_idle=True
        )
        events = [event async for event in handle.events()]
        assert handle.run_id is not None
        run_id = handle.run_id
        assert handle.snapshot is not None and handle.snapshot.run.until_idle

        completed = assert_until_idle_run(events, run_id)
        task = await client.get_task(completed.task_id)
        assert_completed_task(task, run_id, completed.task_id)
        run = await client.get_run(run_id)
        assert run.state == pb.RUN_STATE_SUCCEEDED and run.until_idle

        page = await client.list_tasks(run_id=run_id)
        assert [t.task_id for t in page.tasks] == [task.task_id] and page.next_page_token == ""
        assert page.tasks[0] == task
        assert task.task_id in [
            t.task_id
            for t in (
                await client.list_tasks(agent_id="scripted", statuses=[pb.TASK_STATUS_COMPLETED])
            ).tasks
        ]
        running = await client.list_tasks(
            run_id=run_id, statuses=[pb.TASK_STATUS_QUEUED, pb.TASK_STATUS_STARTED]
        )
        assert list(running.tasks) == []

        # A completed task is not retried; cancelling it changes nothing.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.retry_task(task.task_id)
        assert_code(refused.value, grpc.StatusCode.FAILED_PRECONDITION, "TASK_NOT_RETRYABLE")
        assert error_info(refused.value).metadata["task_id"] == task.task_id
        assert await client.cancel_task(task.task_id, reason="too late") == task


async def test_without_until_idle_the_run_finishes_and_its_task_goes_on(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        handle = client.stream("scripted", script(slow("b", 300), text(1)))
        events = [event async for event in handle.events()]
        assert handle.run_id is not None
        assert_contiguous(events)
        assert payloads(events)[-1] == "finish"
        assert task_updates(events)[-1].status not in ENDED
        assert "got [task" not in text_of(events)
        task_id = task_updates(events)[0].task_id
        assert_task_id_of(task_id, handle.run_id)

        async def completed() -> pb.Task | None:
            task = await client.get_task(task_id)
            return task if task.status == pb.TASK_STATUS_COMPLETED else None

        task = await eventually(completed, "the task to complete after its run")
        assert task.result_json == "1" and task.attempt == 1


async def test_cancel_task_and_retry_task_of_a_long_task(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        run = await client.start_run("scripted", script(slow("c", LONG_MS)), until_idle=True)
        assert run.until_idle

        async def started() -> pb.Task | None:
            page = await client.list_tasks(run_id=run.run_id)
            tasks = [t for t in page.tasks if t.status == pb.TASK_STATUS_STARTED]
            return tasks[0] if tasks else None

        task = await eventually(started, "the long task to start")
        assert_task_id_of(task.task_id, run.run_id)
        assert task.args_json and task.attempt == 1

        asked = await client.cancel_task(task.task_id, reason="enough")
        assert asked.task_id == task.task_id

        async def cancelled() -> pb.Task | None:
            now = await client.get_task(task.task_id)
            return now if now.status == pb.TASK_STATUS_CANCELLED else None

        ended = await eventually(cancelled, "the task to end CANCELLED")
        assert ended.error == "enough" and ended.result_json == ""

        # The run waited for its task: the cancellation is on its stream, and reached the model.
        events = [event async for event in client.run(run.run_id).events()]
        assert_contiguous(events)
        assert payloads(events)[-1] == "finish"
        updates = task_updates(events)
        assert statuses(updates)[-1] == "CANCELLED" and updates[-1].message == "enough"
        assert f"[task {task.task_id}] slow cancelled" in text_of(events)

        # Retried: QUEUED again, same id; cancelled again so the test ends quickly.
        retried = await client.retry_task(task.task_id)
        assert retried.task_id == task.task_id
        assert retried.status == pb.TASK_STATUS_QUEUED and retried.error == ""
        await client.cancel_task(task.task_id, reason="again")
        ended = await eventually(cancelled, "the retried task to end CANCELLED")
        assert ended.error == "again"
        # CANCELLED (like FAILED) may be retried again and again; the others may not.
        await client.retry_task(task.task_id)
        await client.cancel_task(task.task_id)
        await eventually(cancelled, "the task retried twice to end CANCELLED")


async def test_retry_task_of_a_failed_task_gives_it_a_fresh_retry_budget(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        # 4 failing attempts: the first and its 3 retries. The run ends with the failure.
        handle = client.stream("scripted", script(slow("f", 20, fail_times=4)), until_idle=True)
        events = [event async for event in handle.events()]
        assert payloads(events)[-1] == "finish"
        updates = task_updates(events)
        assert statuses(updates).count("RETRYING") == 3
        assert statuses(updates)[-1] == "FAILED" and "(attempt 4)" in updates[-1].message
        task_id = updates[-1].task_id
        assert f"got [task {task_id}] slow failed: " in text_of(events)
        failed = await client.get_task(task_id)
        assert failed.status == pb.TASK_STATUS_FAILED and failed.attempt == 4
        assert "failed on purpose (attempt 4)" in failed.error

        # Retried after its run ended: it goes on by itself, its attempts counted on.
        retried = await client.retry_task(task_id)
        assert retried.status == pb.TASK_STATUS_QUEUED and retried.error == ""

        async def ended() -> pb.Task | None:
            task = await client.get_task(task_id)
            return task if task.status in ENDED else None

        task = await eventually(ended, "the retried task to end")
        assert task.status == pb.TASK_STATUS_COMPLETED, task
        assert task.attempt == 5 and task.result_json == "1"


async def test_unknown_and_malformed_task_ids(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        calls: list[Callable[[], Awaitable[pb.Task]]] = [
            lambda: client.get_task(UNKNOWN_TASK),
            lambda: client.cancel_task(UNKNOWN_TASK, reason="nothing"),
            lambda: client.retry_task(UNKNOWN_TASK),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call()
            assert_code(missing.value, grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND")
            assert error_info(missing.value).metadata["task_id"] == UNKNOWN_TASK
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await client.get_task("not a task id")
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        empty = await client.list_tasks(run_id=UNKNOWN_TASK.split(".")[0])
        assert list(empty.tasks) == [] and empty.next_page_token == ""


async def test_list_tasks_pages_newest_first(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        steps = [slow(f"p{i}", 50) for i in range(3)]
        handle = client.stream("scripted", script(*steps), until_idle=True)
        events = [event async for event in handle.events()]
        assert handle.run_id is not None
        made = list(dict.fromkeys(u.task_id for u in task_updates(events)))
        assert len(made) == 3

        seen: list[str] = []
        token = ""
        while True:
            page = await client.list_tasks(run_id=handle.run_id, page_size=2, page_token=token)
            assert len(page.tasks) <= 2
            seen.extend(t.task_id for t in page.tasks)
            token = page.next_page_token
            if not token:
                break
        assert seen == made[::-1]


# The blocking client.


async def test_sync_task_helpers(keel: Keel) -> None:
    target = f"127.0.0.1:{keel.port}"

    def use() -> None:
        with blocking_client.KeelClient(target, **FAST) as client:
            # A run with until_idle: the task's life on its stream, then get/list.
            handle = client.stream(
                "scripted", script(slow("s", 200, fail_times=1), text(1)), until_idle=True
            )
            events = list(handle.events())
            assert handle.run_id is not None
            completed = assert_until_idle_run(events, handle.run_id)
            task = client.get_task(completed.task_id)
            assert_completed_task(task, handle.run_id, completed.task_id)
            assert [t.task_id for t in client.list_tasks(run_id=handle.run_id).tasks] == [
                task.task_id
            ]
            with pytest.raises(grpc.RpcError) as refused:
                client.retry_task(task.task_id)
            assert_code(refused.value, grpc.StatusCode.FAILED_PRECONDITION, "TASK_NOT_RETRYABLE")

            # A long task, cancelled, retried, cancelled again.
            run = client.start_run("scripted", script(slow("t", LONG_MS)), until_idle=True)
            assert run.until_idle

            def started() -> pb.Task | None:
                page = client.list_tasks(run_id=run.run_id, statuses=[pb.TASK_STATUS_STARTED])
                return page.tasks[0] if page.tasks else None

            long = eventually_sync(started, "the long task to start")

            def cancelled() -> pb.Task | None:
                now = client.get_task(long.task_id)
                return now if now.status == pb.TASK_STATUS_CANCELLED else None

            client.cancel_task(long.task_id, reason="enough")
            assert eventually_sync(cancelled, "the task to end CANCELLED").error == "enough"
            run_events = list(client.run(run.run_id).events())
            assert statuses(task_updates(run_events))[-1] == "CANCELLED"
            assert payloads(run_events)[-1] == "finish"
            retried = client.retry_task(long.task_id)
            assert retried.status == pb.TASK_STATUS_QUEUED and retried.task_id == long.task_id
            client.cancel_task(long.task_id, reason="again")
            assert eventually_sync(cancelled, "the retried task to end CANCELLED").error == "again"

            with pytest.raises(grpc.RpcError) as missing:
                client.get_task(UNKNOWN_TASK)
            assert_code(missing.value, grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND")

            # A thread's turn with until_idle.
            thread = client.create_thread()
            turn = client.send(
                thread.thread_id, "scripted", script(slow("v", 50), text(1)), until_idle=True
            )
            turn_events = list(turn.events())
            assert statuses(task_updates(turn_events))[-1] == "COMPLETED"
            assert "slow completed: 1 " in text_of(turn_events)

    await blocking(use)


async def test_send_with_until_idle_waits_for_the_turns_task(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        turn = client.send(
            thread.thread_id, "scripted", script(slow("u", 100), text(1)), until_idle=True
        )
        events = [event async for event in turn.events()]
        assert payloads(events)[-1] == "finish"
        assert statuses(task_updates(events))[-1] == "COMPLETED"
        assert "slow completed: 1 " in text_of(events)
