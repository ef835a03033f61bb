"""What a background tool's function knows while it runs as a task.

    from server.tasks import task_context

    async def export(table: str) -> int:
        ctx = task_context()
        ...
        await ctx.progress(0.5, "half the rows written")
        ...

`task_context()` works inside a task only (a LookupError elsewhere). The
task's id is stable across its attempts and across the death of the server
running it (a task is run at least once): give it, as `idempotency_key`, to
whatever the tool changes.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.agents.types import Counters


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The running task, as its tool's function sees it."""

    task_id: str
    run_id: str
    attempt: int  # 1 for the first attempt; each retry or takeover adds one
    counters: Counters  # the run's counters (the scripted agent's test tools use them)
    report: Callable[[float, str], Awaitable[None]]

    @property
    def idempotency_key(self) -> str:
        """A key stable across every attempt of this task: give it to side effects."""
        return self.task_id

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0 to 1): a TaskUpdate PROGRESS event on the run's stream."""
        await self.report(min(1.0, max(0.0, fraction)), message)


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("keel_task")


def task_context() -> TaskContext:
    """The task this code runs in. Raises LookupError outside a background task."""
    return _current.get()


def enter(context: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(context)


def leave(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)
