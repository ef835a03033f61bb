"""The TaskStore: background tasks, their runs' task logs, the queue and the slots.

Two implementations pass one contract suite (tests/contract): the memory
store (one process) and the Redis store (every server sharing the store).

- A task's record and its run's task log live beside the run (on Redis in
  the run's slot): every change of a task is one atomic step that updates
  the record, appends an entry to the log, and rings its run's doorbell. The
  run's owner reads the log from the position it has reached and turns the
  entries into TaskUpdate events (server/runs/supervisor.py).
- The queue holds the ids of the tasks waiting for a slot, oldest first (a
  retrying task only once its backoff passed).
- Slots: a task runs only while it holds a slot of the global limit and one
  of its agent's limit. A slot is held with a lease, renewed by its runner,
  so a dead server's slots come back by themselves.
- Ownership of a running task works like a run's: a lease and an epoch that
  every write of its runner carries; a task whose lease lapsed is started
  again (same task id, a new attempt) by any server.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from server.events.log import Subscription
from server.tasks.records import TaskPageCursor, TaskRecord, TaskStatus


class Slot(enum.Enum):
    """What acquire_slot got."""

    HELD = "held"  # a global slot and one of the agent's
    FULL = "full"  # every global slot is taken: no task can start now
    AGENT_FULL = "agent_full"  # the agent's are taken: another agent's task may start


class Renewal(enum.Enum):
    """What renew_task found."""

    RENEWED = "renewed"
    LOST = "lost"  # the task moved on (another epoch) or is not running
    # Renewed, but a cancel request is waiting: the runner stops the attempt (the
    # request's message is only a doorbell; this is how a lost one is still heard).
    CANCEL_REQUESTED = "cancel_requested"


class TaskListener(Protocol):
    """Hears about a run's tasks (called on the event loop; must not block)."""

    def on_task_log(self) -> None:
        """The run's task log grew (a doorbell: read it)."""

    def on_task_cancel(self, task_id: str) -> None:
        """A running task of the run was asked to stop."""


class TaskDoorbell:
    """The control listener of a run's task notifications, as both shared stores send
    them ("cancel:<task id>", or "log": the run's task log grew), turned into
    TaskListener calls."""

    def __init__(self, listener: TaskListener) -> None:
        self._listener = listener

    def on_cancel(self, message: str) -> None:  # the fanout's control-listener callback
        if message.startswith("cancel:"):
            self._listener.on_task_cancel(message.removeprefix("cancel:"))
        else:
            self._listener.on_task_log()


class TaskStore(Protocol):
    """Background tasks; see the module docstring."""

    async def create_task(self, task: TaskRecord) -> tuple[TaskRecord, bool]:
        """Store a new QUEUED task (log: QUEUED) and queue it, unless its id exists.

        Returns the stored task and whether this call created it.
        """

    async def get_task(self, task_id: str) -> TaskRecord:
        """The task. Raises TaskNotFound."""

    async def list_tasks(
        self,
        *,
        run_id: str = "",
        agent_id: str = "",
        statuses: frozenset[TaskStatus] = frozenset(),
        tenant: str | None = None,
        limit: int,
        after: TaskPageCursor | None = None,
    ) -> list[TaskRecord]:
        """Up to `limit` tasks, newest first, strictly after `after`, filtered."""

    async def task_log(self, run_id: str, start: int) -> list[bytes]:
        """The run's task log entries from position `start` (0: the first)."""

    async def subscribe_tasks(self, run_id: str, listener: TaskListener) -> Subscription:
        """Register `listener` for the run's task doorbells (see TaskListener)."""

    # Running tasks.

    async def due(self, limit: int) -> list[str]:
        """Up to `limit` ids of queued tasks whose time has come, oldest first."""

    async def acquire_slot(
        self, task_id: str, agent_id: str, *, global_limit: int, agent_limit: int
    ) -> Slot:
        """Take one global slot and one of the agent's (agent_limit 0: no agent limit).

        Both or neither; a task that holds its slots already keeps them
        (and they are renewed). Slots are held for the store's lease TTL.
        """

    async def renew_slot(self, task_id: str, agent_id: str) -> None:
        """Extend the task's hold of its slots by the lease TTL."""

    async def release_slot(self, task_id: str, agent_id: str) -> None:
        """Give the task's slots back (no-op if it holds none)."""

    async def start_task(self, task_id: str, owner: str) -> TaskRecord | None:
        """Start the task's next attempt, owned by `owner`, atomically.

        A QUEUED task, a RETRYING one whose backoff passed, or a RUNNING one
        whose lease lapsed (its runner died): status RUNNING, attempt + 1,
        epoch + 1, a fresh lease; the log gets STARTED. The task leaves the
        queue. None when the task is not startable (ended, running with a
        live lease, waiting for its backoff) or unknown; an ended one is
        dropped from the queue.
        """

    async def renew_task(self, task_id: str, epoch: int) -> Renewal:
        """Extend the lease of the attempt at `epoch` (see Renewal)."""

    async def report_progress(
        self, task_id: str, epoch: int, progress: float, message: str
    ) -> None:
        """Record a running attempt's progress (log: PROGRESS). Raises StaleEpoch."""

    async def finish_task(
        self,
        task_id: str,
        epoch: int,
        status: TaskStatus,
        *,
        result_json: str = "",
        error: str = "",
        retry_at_ms: int = 0,
        thread_entry: bytes = b"",
    ) -> TaskRecord:
        """End the attempt at `epoch` with `status`: COMPLETED, FAILED, CANCELLED or
        RETRYING (queued again once `retry_at_ms` has come). The log gets the
        new status. A COMPLETED or FAILED task of a run on a thread that does
        not wait for it (not until_idle) also adds `thread_entry` to the
        thread: to its history if the thread is idle, else to what the active
        run's terminal append adds after its own messages. Raises StaleEpoch.
        """

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        """Stop a task that has not ended. A waiting one ends CANCELLED now (log:
        CANCELLED); a running one records the request and its runner is told.
        An ended task is returned as it is. Raises TaskNotFound.
        """

    async def retry_task(self, task_id: str) -> TaskRecord:
        """Queue a FAILED or CANCELLED task again with a fresh retry budget (log:
        QUEUED). Raises TaskNotFound; TaskNotRetryable for any other status.
        """

    async def run_tasks(self, run_id: str) -> list[TaskRecord]:
        """Every task of the run."""

    async def lapsed(self, limit: int) -> list[str]:
        """Ids of RUNNING tasks whose lease lapsed, queued again for start_task."""

    async def close(self) -> None:
        """Release connections and background tasks; safe to call more than once."""


def ended(tasks: Sequence[TaskRecord]) -> bool:
    return all(task.status.ended for task in tasks)
