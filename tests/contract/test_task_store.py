"""The TaskStore contract: every test runs against the memory, Redis and PostgreSQL stores
alike."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from server.errors import StaleEpoch, TaskNotFound, TaskNotRetryable
from server.events.log import BusyPolicy, EventLog, RunRecord, RunState
from server.events.memory import MemoryEventLog
from server.tasks.factory import task_store_for
from server.tasks.memory import MemoryTaskStore
from server.tasks.records import (
    TaskPageCursor,
    TaskRecord,
    TaskStatus,
    entry_status,
    task_id_for,
    task_update,
)
from server.tasks.store import Renewal, Slot, TaskStore
from tests.contract.test_event_log import LogClock, OpenEventLog, make_events, new_run
from tests.contract.test_event_log_threads import new_thread, run_on

LEASE_TTL_S = 0.5
OpenStore = Callable[..., Awaitable[tuple[EventLog, TaskStore]]]


@pytest.fixture
async def open_store(open_event_log: OpenEventLog, log_clock: LogClock) -> OpenStore:
    async def open_store(**log_options: float) -> tuple[EventLog, TaskStore]:
        log = await open_event_log(**log_options)
        store: TaskStore
        if isinstance(log, MemoryEventLog):
            store = MemoryTaskStore(log, lease_ttl_s=LEASE_TTL_S, clock=log_clock)
        else:  # Redis or PostgreSQL: the store beside the log, on the log's connections
            store = task_store_for(log, lease_ttl_s=LEASE_TTL_S)
        return log, store

    return open_store


def task_of(run: RunRecord, call: str = "call-1", **fields: object) -> TaskRecord:
    now = time.time_ns() // 1_000_000
    values: dict[str, object] = {
        "task_id": task_id_for(run.run_id, call),
        "run_id": run.run_id,
        "agent_id": run.agent_id,
        "tool_name": "slow",
        "tool_call_id": call,
        "args_json": '{"key": "k"}',
        "status": TaskStatus.QUEUED,
        "create_time_ms": now,
        "update_time_ms": now,
        "timeout_s": 30.0,
        "max_retries": 2,
        "thread_id": run.thread_id,
    }
    values.update(fields)
    return TaskRecord(**values)  # type: ignore[arg-type]


def statuses(log_entries: list[bytes]) -> list[str]:
    return [entry_status(entry)[1] for entry in log_entries]


async def test_a_task_is_created_once_queued_and_logged(open_store: OpenStore) -> None:
    log, store = await open_store()
    run = await new_run(log)
    task = task_of(run)
    stored, created = await store.create_task(task)
    assert created and stored == task
    again, created_again = await store.create_task(task_of(run, args_json="{}"))
    assert not created_again and again.args_json == task.args_json
    assert await store.get_task(task.task_id) == task
    assert await store.due(10) == [task.task_id]
    [entry] = await store.task_log(run.run_id, 0)
    update = task_update(entry)
    assert (update.task_id, update.name, update.tool_call_id) == (task.task_id, "slow", "call-1")
    with pytest.raises(TaskNotFound):
        await store.get_task(f"{run.run_id}.{'f' * 16}")
    with pytest.raises(TaskNotFound):
        await store.get_task("not-a-task")


async def test_a_task_runs_attempt_after_attempt_and_every_change_is_logged(
    open_store: OpenStore,
) -> None:
    log, store = await open_store()
    run = await new_run(log)
    task, _ = await store.create_task(task_of(run))
    first = await store.start_task(task.task_id, "runner-a")
    assert first is not None
    assert (first.status, first.attempt, first.owner) == (TaskStatus.RUNNING, 1, "runner-a")
    assert await store.due(10) == []  # it left the queue
    assert await store.start_task(task.task_id, "runner-b") is None  # its lease is held
    await store.report_progress(task.task_id, first.epoch, 0.5, "halfway")
    soon = time.time_ns() // 1_000_000 + 150
    retrying = await store.finish_task(
        task.task_id, first.epoch, TaskStatus.RETRYING, error="boom", retry_at_ms=soon
    )
    assert (retrying.status, retrying.failures, retrying.error) == (TaskStatus.RETRYING, 1, "boom")
    assert await store.start_task(task.task_id, "runner-b") is None  # not due yet
    with pytest.raises(StaleEpoch):  # the first attempt is over
        await store.report_progress(task.task_id, first.epoch, 0.9, "")
    await asyncio.sleep(0.2)
    assert await store.due(10) == [task.task_id]
    second = await store.start_task(task.task_id, "runner-b")
    assert second is not None and (second.attempt, second.epoch) == (2, first.epoch + 1)
    done = await store.finish_task(
        task.task_id, second.epoch, TaskStatus.COMPLETED, result_json="42"
    )
    assert (done.status, done.result_json, done.progress) == (TaskStatus.COMPLETED, "42", 1.0)
    assert await store.start_task(task.task_id, "runner-c") is None  # ended
    entries = await store.task_log(run.run_id, 0)
    assert statuses(entries) == [
        "queued",
        "running",
        "progress",
        "retrying",
        "running",
        "completed",
    ]
    updates = [task_update(e) for e in entries]
    assert [u.attempt for u in updates] == [0, 1, 1, 2, 2, 2]
    assert updates[2].progress == 0.5 and updates[2].message == "halfway"
    assert updates[3].message == "boom" and updates[5].result_json == "42"
    assert await store.task_log(run.run_id, 5) == entries[5:]


async def test_slots_hold_a_global_and_an_agent_limit_and_come_back_when_a_holder_dies(
    open_store: OpenStore, log_clock: LogClock
) -> None:
    _, store = await open_store()
    agent = f"agent-{uuid.uuid4().hex[:6]}"
    other = f"other-{uuid.uuid4().hex[:6]}"
    limits = {"global_limit": 3, "agent_limit": 2}
    assert await store.acquire_slot("t1", agent, **limits) is Slot.HELD
    assert await store.acquire_slot("t2", agent, **limits) is Slot.HELD
    assert await store.acquire_slot("t3", agent, **limits) is Slot.AGENT_FULL
    assert await store.acquire_slot("t1", agent, **limits) is Slot.HELD  # re-entrant
    assert await store.acquire_slot("o1", other, **limits) is Slot.HELD
    assert await store.acquire_slot("o2", other, **limits) is Slot.FULL  # the global limit
    await store.release_slot("t1", agent)
    assert await store.acquire_slot("o2", other, **limits) is Slot.HELD
    # Holders that stop renewing lose their slots after the lease TTL.
    await store.renew_slot("o2", other)
    await log_clock.advance(LEASE_TTL_S * 2)
    assert await store.acquire_slot("t4", agent, **limits) is Slot.HELD
    assert await store.acquire_slot("t5", agent, **limits) is Slot.HELD


async def test_a_running_task_whose_runner_died_is_queued_again_and_taken_over(
    open_store: OpenStore, log_clock: LogClock
) -> None:
    log, store = await open_store()
    run = await new_run(log)
    task, _ = await store.create_task(task_of(run))
    first = await store.start_task(task.task_id, "dies")
    assert first is not None
    assert await store.lapsed(10) == []
    assert await store.renew_task(task.task_id, first.epoch) is Renewal.RENEWED
    await log_clock.advance(LEASE_TTL_S * 2)
    assert await store.lapsed(10) == [task.task_id]
    assert task.task_id in await store.due(10)
    second = await store.start_task(task.task_id, "survivor")
    assert second is not None and (second.attempt, second.owner) == (2, "survivor")
    # The dead runner is fenced.
    assert await store.renew_task(task.task_id, first.epoch) is Renewal.LOST
    with pytest.raises(StaleEpoch):
        await store.finish_task(task.task_id, first.epoch, TaskStatus.COMPLETED)
    await store.finish_task(task.task_id, second.epoch, TaskStatus.COMPLETED, result_json="1")
    assert await store.lapsed(10) == []


async def test_cancel_ends_a_waiting_task_and_asks_a_running_one(open_store: OpenStore) -> None:
    log, store = await open_store()
    run = await new_run(log)
    waiting, _ = await store.create_task(task_of(run, "waits"))
    running, _ = await store.create_task(task_of(run, "runs"))
    started = await store.start_task(running.task_id, "runner")
    assert started is not None
    heard: list[str] = []

    class Listener:
        def on_task_log(self) -> None:
            heard.append("log")

        def on_task_cancel(self, task_id: str) -> None:
            heard.append(f"cancel:{task_id}")

    subscription = await store.subscribe_tasks(run.run_id, Listener())
    cancelled = await store.cancel_task(waiting.task_id, "not needed")
    assert (cancelled.status, cancelled.error) == (TaskStatus.CANCELLED, "not needed")
    assert waiting.task_id not in await store.due(10)
    asked = await store.cancel_task(running.task_id, "stop it")
    assert (asked.status, asked.cancel_reason) == (TaskStatus.RUNNING, "stop it")
    for _ in range(100):
        if f"cancel:{running.task_id}" in heard:
            break
        await asyncio.sleep(0.01)
    assert "log" in heard and f"cancel:{running.task_id}" in heard
    # The message is a doorbell: the runner's next renewal hears the request too.
    assert await store.renew_task(running.task_id, started.epoch) is Renewal.CANCEL_REQUESTED
    ended = await store.finish_task(
        running.task_id, started.epoch, TaskStatus.CANCELLED, error="stop it"
    )
    assert await store.cancel_task(running.task_id, "again") == ended  # ended: unchanged
    await subscription.close()


async def test_retry_queues_a_failed_or_cancelled_task_with_a_fresh_budget(
    open_store: OpenStore,
) -> None:
    log, store = await open_store()
    run = await new_run(log)
    task, _ = await store.create_task(task_of(run, max_retries=0))
    with pytest.raises(TaskNotRetryable):
        await store.retry_task(task.task_id)  # queued
    started = await store.start_task(task.task_id, "runner")
    assert started is not None
    with pytest.raises(TaskNotRetryable):
        await store.retry_task(task.task_id)  # running
    failed = await store.finish_task(task.task_id, started.epoch, TaskStatus.FAILED, error="x")
    assert failed.failures == 1
    queued = await store.retry_task(task.task_id)
    assert (queued.status, queued.failures, queued.error) == (TaskStatus.QUEUED, 0, "")
    assert task.task_id in await store.due(10)
    again = await store.start_task(task.task_id, "runner")
    assert again is not None and again.attempt == 2
    await store.finish_task(task.task_id, again.epoch, TaskStatus.COMPLETED, result_json="1")
    with pytest.raises(TaskNotRetryable) as caught:
        await store.retry_task(task.task_id)
    assert caught.value.status == "completed"
    with pytest.raises(TaskNotFound):
        await store.retry_task(f"{run.run_id}.{'0' * 16}")


async def test_list_tasks_filters_by_run_agent_and_status_newest_first(
    open_store: OpenStore,
) -> None:
    log, store = await open_store()
    runs = [await new_run(log, agent_id=agent) for agent in ("alpha", "alpha", "beta")]
    made: list[TaskRecord] = []
    for n, run in enumerate(runs):
        for k in range(2):
            task, _ = await store.create_task(
                task_of(run, f"call-{k}", create_time_ms=10_000 + 10 * n + k)
            )
            made.append(task)
    started = await store.start_task(made[0].task_id, "runner")
    assert started is not None
    of_run = await store.list_tasks(run_id=runs[0].run_id, limit=10)
    assert [t.task_id for t in of_run] == [made[1].task_id, made[0].task_id]
    of_beta = await store.list_tasks(agent_id="beta", limit=10)
    assert {t.task_id for t in of_beta} == {made[4].task_id, made[5].task_id}
    running = await store.list_tasks(statuses=frozenset({TaskStatus.RUNNING}), limit=100)
    assert made[0].task_id in {t.task_id for t in running}
    assert all(t.status is TaskStatus.RUNNING for t in running)
    first = await store.list_tasks(run_id=runs[1].run_id, limit=1)
    cursor = TaskPageCursor(first[0].create_time_ms, first[0].task_id)
    rest = await store.list_tasks(run_id=runs[1].run_id, limit=5, after=cursor)
    assert [t.task_id for t in [*first, *rest]] == [made[3].task_id, made[2].task_id]
    assert {t.task_id for t in await store.run_tasks(runs[2].run_id)} == {
        made[4].task_id,
        made[5].task_id,
    }


async def test_a_late_result_joins_an_idle_thread_or_follows_the_active_runs_messages(
    open_store: OpenStore,
) -> None:
    log, store = await open_store()
    thread = await new_thread(log)
    first = run_on(thread.thread_id)
    await log.start_thread_run(first, BusyPolicy.REJECT)
    busy_task, _ = await store.create_task(task_of(first, "busy"))
    idle_task, _ = await store.create_task(task_of(first, "idle"))
    waiting_task, _ = await store.create_task(task_of(first, "waits", until_idle=True))
    started = [await store.start_task(t.task_id, "runner") for t in (busy_task, idle_task)]
    assert all(s is not None for s in started)
    # Finished while its run still has the thread: after that run's own messages.
    await store.finish_task(
        busy_task.task_id,
        started[0].epoch,  # type: ignore[union-attr]
        TaskStatus.COMPLETED,
        result_json="1",
        thread_entry=b"late-1",
    )
    assert (await log.get_thread(thread.thread_id)).message_count == 0
    await log.append(
        first.run_id,
        1,
        make_events(first.run_id, 0, 1),
        state=RunState.SUCCEEDED,
        thread_messages=[b"own-1", b"own-2"],
    )
    assert await log.thread_messages(thread.thread_id, 0, 10) == [b"own-1", b"own-2", b"late-1"]
    # Finished while the thread is idle: straight into its history.
    await store.finish_task(
        idle_task.task_id,
        started[1].epoch,  # type: ignore[union-attr]
        TaskStatus.FAILED,
        error="x",
        thread_entry=b"late-2",
    )
    assert (await log.thread_messages(thread.thread_id, 3, 10)) == [b"late-2"]
    # A task whose run waits for it (until_idle) gives its result to the model instead.
    waiting = await store.start_task(waiting_task.task_id, "runner")
    assert waiting is not None
    await store.finish_task(
        waiting_task.task_id,
        waiting.epoch,
        TaskStatus.COMPLETED,
        result_json="2",
        thread_entry=b"not-for-the-thread",
    )
    assert (await log.get_thread(thread.thread_id)).message_count == 4


async def test_a_tasks_record_expires_with_its_run(
    open_store: OpenStore, log_clock: LogClock
) -> None:
    log, store = await open_store(terminal_ttl_s=0.3)
    run = await new_run(log)
    task, _ = await store.create_task(task_of(run))
    started = await store.start_task(task.task_id, "runner")
    assert started is not None
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.SUCCEEDED)
    done = await store.finish_task(task.task_id, started.epoch, TaskStatus.COMPLETED)
    assert json.loads(done.args_json) == {"key": "k"}
    await log_clock.advance(0.6)
    with pytest.raises(TaskNotFound):
        await store.get_task(task.task_id)
    assert await store.task_log(run.run_id, 0) == []
