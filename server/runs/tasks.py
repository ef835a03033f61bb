"""A run's background tasks, from the run's side: their events, and waiting for them.

- TaskEvents turns the run's task log (server/tasks/store.py) into TaskUpdate
  events, through the run's writer, from the entry its last checkpoint
  reached (EventWriter.task_mark). The run's owner is the only writer of its
  log, so a task's life reaches the stream in order and, across takeovers,
  exactly as the supersede rules say: entries whose events an interrupted
  attempt wrote after its checkpoint are superseded with it and written
  again.
- until_idle: when the model is done, the run waits for the tasks it started
  (WAITING checkpoint; no model call is held), and gives each task's outcome
  to the model as a new user message, in the order the tasks ended, until
  the model is done with no task left.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from keel.v1 import agent_service_pb2 as pb
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelRequest, UserPromptPart

from server import background
from server.agents.checkpoint import Checkpoint, Phase, dump_messages
from server.agents.events import usage_to_pb
from server.agents.types import LoopResult
from server.events.log import Subscription
from server.runs.writer import EventWriter
from server.tasks.records import TaskRecord, task_update
from server.tasks.runner import TaskLimits, TaskRunner
from server.tasks.store import TaskStore
from server.threads.history import task_result_prompt

# How often a run that waits for its tasks reads their log without a doorbell
# (a lost pub/sub message costs at most this much latency).
POLL_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Tasks:
    """What the executor gives its runs for background tasks."""

    store: TaskStore
    runner: TaskRunner
    limits: TaskLimits


class TaskEvents:
    """A TaskListener for one run: its doorbell, and the events of its task log."""

    def __init__(self, store: TaskStore, run_id: str, writer: EventWriter) -> None:
        self._store = store
        self._run_id = run_id
        self._writer = writer
        self._lock = asyncio.Lock()  # one reader of the log at a time: no entry twice
        self._rings = 0  # how often the doorbell rang
        self._waiters: list[asyncio.Future[None]] = []
        self._subscription: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    # TaskListener

    def on_task_log(self) -> None:
        self._rings += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def on_task_cancel(self, task_id: str) -> None:
        """Task runners act on these; the run's events follow from its log."""

    async def open(self) -> None:
        """Listen to the run's doorbell, and emit whatever its log holds, from now on;
        a no-op once open (or closed)."""
        if self._subscription is not None or self._closed:
            return
        self._subscription = await self._store.subscribe_tasks(self._run_id, self)
        self._watcher = asyncio.create_task(self._watch(), name=f"task-events:{self._run_id}")

    async def close(self) -> None:
        """Stop listening; safe to call more than once."""
        # The flag, not only the cancellation, ends the watcher: a cancellation
        # swallowed below it (observed: a watcher cancelled right after it emitted
        # went on polling, and this await never returned) must not hang the run.
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await background.stop(watcher)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close()

    @property
    def rings(self) -> int:
        return self._rings

    async def emit_new(self) -> bool:
        """Emit the events of the log's entries from the writer's task mark; True if any."""
        async with self._lock:
            entries = await self._store.task_log(self._run_id, self._writer.task_mark)
            for entry in entries:
                event = pb.AgentEvent(
                    task=task_update(entry), step=self._writer.step, attempt=self._writer.attempt
                )
                await self._writer.emit_task(event)
            return bool(entries)

    async def rung_since(self, rings: int) -> None:
        """Until the doorbell rang after `rings` (see `rings`), or POLL_INTERVAL_S passed."""
        if self._rings > rings:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_INTERVAL_S):
                await waiter

    async def _watch(self) -> None:
        while not self._closed:
            rings = self._rings
            await self.emit_new()
            await self.rung_since(rings)


def outcome_key(task: TaskRecord) -> str:
    """What a checkpoint records of an outcome given to the model: a task retried
    (RetryTask) after its outcome was given ends again, with another attempt."""
    return f"{task.task_id}@{task.attempt}"


def next_outcome(tasks: list[TaskRecord], fed: tuple[str, ...]) -> TaskRecord | bool:
    """The first outcome not yet given to the model (in the order the tasks ended);
    else True while a task is still going, False when none is left."""
    ended = sorted(
        (t for t in tasks if t.status.ended and outcome_key(t) not in fed),
        key=lambda t: t.update_time_ms,
    )
    if ended:
        return ended[0]
    return any(not task.status.ended for task in tasks)


def waiting_checkpoint(result: LoopResult) -> Checkpoint:
    """WAITING: the model is done with `result`; the run waits for its tasks."""
    return Checkpoint(
        phase=Phase.WAITING,
        step=result.step,
        messages=result.messages,
        usage=result.run_usage,
        step_start_usage=result.run_usage,
        output_text=result.output_text,
        output_json=result.output_json,
    )


def waited(waiting: Checkpoint) -> LoopResult:
    """The result a WAITING checkpoint stands for (a run taken over while it waited)."""
    return LoopResult(
        waiting.output_text,
        waiting.output_json,
        usage_to_pb(waiting.usage),
        messages=waiting.messages,
        step=waiting.step,
        run_usage=waiting.usage,
    )


def outcome_checkpoint(result: LoopResult, task: TaskRecord) -> Checkpoint:
    """A STEP checkpoint whose history ends with the task's outcome as a user message:
    resuming from it makes the model's next request (server/agents/loop.py)."""
    prompt = task_result_prompt(
        task.task_id,
        task.tool_name,
        task.status.value,
        result_json=task.result_json,
        error=task.error,
    )
    own = ModelMessagesTypeAdapter.validate_json(result.messages)
    told = [*own, ModelRequest(parts=[UserPromptPart(prompt)])]
    return Checkpoint(
        phase=Phase.STEP,
        step=result.step,
        messages=dump_messages(told),
        usage=result.run_usage,
        step_start_usage=result.run_usage,
    )
