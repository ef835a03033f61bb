"""A run stopped twice (CancelRun stops a run it finds here, and the owner also hears the
request on the run's control channel) still finishes its abort: it cancels its tasks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server.agents.testing import registry
from server.events.log import RunRecord, RunState
from server.events.memory import MemoryEventLog
from server.runs.executor import LocalExecutor
from server.runs.supervisor import Stop
from server.tasks.records import TaskStatus


class SecondStopLog(MemoryEventLog):
    """A memory log that, when the aborting supervisor reads its run, stops the run again:
    the moment the control channel's message arrives in the race this test pins down."""

    def __init__(self) -> None:
        super().__init__()
        self.executor: LocalExecutor | None = None
        self.second_stops = 0

    async def get_run(self, run_id: str) -> RunRecord:
        record = await super().get_run(run_id)
        executor = self.executor
        if executor is not None and record.cancel_reason and not record.state.terminal:
            task = executor._tasks.get(run_id)
            # Only the run's own task: the supervisor reading the request to abort it
            # (CancelRun's polling reads the run too, from the caller's task).
            if task is not None and task is asyncio.current_task():
                self.second_stops += 1
                executor._supervisor.stop(run_id, task, Stop.CANCEL, "again")
        return record


async def _wait_for(predicate: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.01)


async def test_a_second_stop_during_the_abort_does_not_leave_its_tasks_running() -> None:
    log = SecondStopLog()
    executor = LocalExecutor(log, registry, instance_id="test")
    log.executor = executor
    executor.open()
    slow = {"tool": "slow", "args": {"key": "long", "duration_ms": 30_000}}
    started = await executor.start("scripted", json.dumps({"steps": [slow, slow]}), until_idle=True)
    started.launch()
    run_id = started.run.run_id
    store = executor._task_store

    async def both_running() -> bool:
        tasks = await store.run_tasks(run_id)
        return len(tasks) == 2 and all(t.status is TaskStatus.RUNNING for t in tasks)

    await _wait_for(both_running)
    cancelled = await executor.cancel(run_id, "enough")
    assert cancelled.state is RunState.CANCELLED
    assert log.second_stops >= 1

    async def both_cancelled() -> bool:
        return all(t.status is TaskStatus.CANCELLED for t in await store.run_tasks(run_id))

    await _wait_for(both_cancelled)
    await executor.drain(0)
