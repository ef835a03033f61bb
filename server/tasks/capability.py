"""Background tools in the agent loop: a call makes a task and returns at once.

A pydantic-ai capability around every tool execution of a run (beside the
tool journal, server/runs/journal.py): a call of a tool whose metadata says
background (records.background) does not run the tool. It stores a task
(idempotent: a step re-run after a takeover finds the task its first attempt
made), wakes this server's task runner, and gives the model this result:

    {"task_id": "...", "status": "queued", "message": "..."}

With overflow "reject" and every slot taken, no task is made and the model
is told the system is busy: {"task_id": "", "status": "rejected", ...}.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from server.events.log import RunRecord
from server.tasks.records import TaskRecord, TaskStatus, background_options, task_id_for
from server.tasks.runner import TaskLimits, TaskRunner
from server.tasks.store import Slot, TaskStore

QUEUED_MESSAGE = "The task runs in the background; its result comes later."
BUSY_MESSAGE = "The system is busy: every slot for background tasks is taken. Try again later."


class BackgroundTools(AbstractCapability[Any]):
    """Turns calls of one run's background tools into tasks."""

    def __init__(
        self,
        store: TaskStore,
        runner: TaskRunner,
        run: RunRecord,
        *,
        limits: TaskLimits,
        agent_limit: int,
        on_task: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_task` is awaited after each task the run makes (before the model hears of it)."""
        self._on_task = on_task
        self._store = store
        self._runner = runner
        self._run = run
        self._limits = limits
        self._agent_limit = agent_limit

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: Any,
        handler: Any,
    ) -> Any:
        options = background_options(tool_def.metadata)
        if options is None:
            return await handler(args)
        run = self._run
        task_id = task_id_for(run.run_id, call.tool_call_id)
        if options.overflow == "reject" and Slot.HELD is not await self._store.acquire_slot(
            task_id,
            run.agent_id,
            global_limit=self._limits.global_concurrency,
            agent_limit=self._agent_limit,
        ):
            return {"task_id": "", "status": "rejected", "message": BUSY_MESSAGE}
        now = time.time_ns() // 1_000_000
        task, _ = await self._store.create_task(
            TaskRecord(
                task_id=task_id,
                run_id=run.run_id,
                agent_id=run.agent_id,
                tool_name=call.tool_name,
                tool_call_id=call.tool_call_id,
                args_json=pydantic_core.to_json(args).decode(),
                status=TaskStatus.QUEUED,
                create_time_ms=now,
                update_time_ms=now,
                timeout_s=options.timeout_s or self._limits.default_timeout_s,
                max_retries=options.max_retries,
                thread_id=run.thread_id,
                until_idle=run.until_idle,
                tenant=run.tenant,
            )
        )
        if self._on_task is not None:
            await self._on_task()
        self._runner.wake()
        return {"task_id": task.task_id, "status": "queued", "message": QUEUED_MESSAGE}
