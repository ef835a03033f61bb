"""MemoryTaskStore: the TaskStore of one process, beside a MemoryEventLog.

Everything runs on the event loop without awaiting, so each method is
atomic. Tasks live as long as their run (a task whose run expired is gone);
a late result of a task of a run on a thread goes to the thread through the
log (MemoryEventLog.add_to_thread).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import StaleEpoch, TaskNotFound, TaskNotRetryable
from server.events.log import Subscription
from server.events.memory import MemoryEventLog
from server.tasks.records import TaskPageCursor, TaskRecord, TaskStatus, log_entry
from server.tasks.store import Renewal, Slot, TaskListener

logger = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True, eq=False)
class _Held:
    """A task's hold of its slots."""

    agent_id: str
    until: float  # clock() deadline


@dataclass(slots=True)
class _RunTasks:
    log: list[bytes] = field(default_factory=list)  # the run's task log
    listeners: dict[_Subscription, None] = field(default_factory=dict)


class _Subscription:
    def __init__(self, tasks: _RunTasks, listener: TaskListener) -> None:
        self._tasks = tasks
        self.listener = listener
        tasks.listeners[self] = None

    async def close(self) -> None:
        self._tasks.listeners.pop(self, None)


class MemoryTaskStore:
    """A TaskStore in this process's memory; see server/tasks/store.py."""

    def __init__(
        self,
        log: MemoryEventLog,
        *,
        lease_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._tasks: dict[str, TaskRecord] = {}
        self._order: list[tuple[int, str]] = []  # (create_time_ms, task_id) ascending
        self._runs: dict[str, _RunTasks] = {}
        self._queue: dict[str, int] = {}  # task id -> due time, unix ms
        self._leases: dict[str, float] = {}  # task id -> clock() deadline of its attempt
        self._held: dict[str, _Held] = {}  # task id -> its slots

    async def create_task(self, task: TaskRecord) -> tuple[TaskRecord, bool]:
        existing = self._find(task.task_id)
        if existing is not None:
            return existing, False
        self._tasks[task.task_id] = task
        bisect.insort(self._order, (task.create_time_ms, task.task_id))
        self._queue[task.task_id] = task.create_time_ms
        self._record(task, log_entry(task, TaskStatus.QUEUED))
        return task, True

    async def get_task(self, task_id: str) -> TaskRecord:
        return self._get(task_id)

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
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        end = len(self._order)
        if after is not None:
            end = bisect.bisect_left(self._order, (after.create_time_ms, after.task_id))
        page: list[TaskRecord] = []
        for position in range(end - 1, -1, -1):
            task = self._find(self._order[position][1])
            if task is None:
                continue
            if run_id and task.run_id != run_id:
                continue
            if agent_id and task.agent_id != agent_id:
                continue
            if tenant is not None and task.tenant != tenant:
                continue
            if statuses and task.status not in statuses:
                continue
            page.append(task)
            if len(page) == limit:
                break
        return page

    async def task_log(self, run_id: str, start: int) -> list[bytes]:
        tasks = self._runs.get(run_id)
        return [] if tasks is None else tasks.log[start:]

    async def subscribe_tasks(self, run_id: str, listener: TaskListener) -> Subscription:
        return _Subscription(self._runs.setdefault(run_id, _RunTasks()), listener)

    async def due(self, limit: int) -> list[str]:
        now = _now_ms()
        ready = sorted((at, task_id) for task_id, at in self._queue.items() if at <= now)
        return [task_id for _, task_id in ready[:limit]]

    async def acquire_slot(
        self, task_id: str, agent_id: str, *, global_limit: int, agent_limit: int
    ) -> Slot:
        now = self._clock()
        for held_id, held in list(self._held.items()):
            if held.until < now:
                del self._held[held_id]  # its runner died: the slot comes back
        if task_id not in self._held:
            if len(self._held) >= global_limit:
                return Slot.FULL
            if agent_limit and sum(h.agent_id == agent_id for h in self._held.values()) >= (
                agent_limit
            ):
                return Slot.AGENT_FULL
        self._held[task_id] = _Held(agent_id, now + self._lease_ttl_s)
        return Slot.HELD

    async def renew_slot(self, task_id: str, agent_id: str) -> None:
        held = self._held.get(task_id)
        if held is not None:
            held.until = self._clock() + self._lease_ttl_s

    async def release_slot(self, task_id: str, agent_id: str) -> None:
        self._held.pop(task_id, None)

    async def start_task(self, task_id: str, owner: str) -> TaskRecord | None:
        task = self._find(task_id)
        if task is None or task.status.ended:
            self._queue.pop(task_id, None)
            return None
        if task.status is TaskStatus.RUNNING and self._lease_held(task_id):
            return None
        if task.status is TaskStatus.RETRYING and task.not_before_ms > _now_ms():
            return None
        started = dataclasses.replace(
            task,
            status=TaskStatus.RUNNING,
            attempt=task.attempt + 1,
            epoch=task.epoch + 1,
            owner=owner,
            update_time_ms=_now_ms(),
        )
        self._queue.pop(task_id, None)
        self._leases[task_id] = self._clock() + self._lease_ttl_s
        self._record(started, log_entry(started, TaskStatus.RUNNING))
        return started

    async def renew_task(self, task_id: str, epoch: int) -> Renewal:
        task = self._find(task_id)
        if task is None or task.epoch != epoch or task.status is not TaskStatus.RUNNING:
            return Renewal.LOST
        self._leases[task_id] = self._clock() + self._lease_ttl_s
        return Renewal.CANCEL_REQUESTED if task.cancel_reason else Renewal.RENEWED

    async def report_progress(
        self, task_id: str, epoch: int, progress: float, message: str
    ) -> None:
        task = self._running(task_id, epoch)
        updated = dataclasses.replace(task, progress=progress, update_time_ms=_now_ms())
        self._record(updated, log_entry(updated, "progress", progress=progress, message=message))

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
        task = self._running(task_id, epoch)
        retrying = status is TaskStatus.RETRYING
        finished = dataclasses.replace(
            task,
            status=status,
            result_json=result_json,
            error=error,
            failures=task.failures + (1 if retrying or status is TaskStatus.FAILED else 0),
            not_before_ms=retry_at_ms if retrying else 0,
            progress=1.0 if status is TaskStatus.COMPLETED else task.progress,
            update_time_ms=_now_ms(),
        )
        self._leases.pop(task_id, None)
        if retrying:
            self._queue[task_id] = retry_at_ms
        entry = log_entry(
            finished,
            status,
            attempt=task.attempt + 1 if retrying else task.attempt,
            progress=finished.progress,
            message=error,
            result_json=result_json,
        )
        self._record(finished, entry)
        late = status in (TaskStatus.COMPLETED, TaskStatus.FAILED)
        if late and task.thread_id and not task.until_idle and thread_entry:
            self._log.add_to_thread(task.thread_id, thread_entry)
        return finished

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        task = self._get(task_id)
        if task.status.ended:
            return task
        if task.status is TaskStatus.RUNNING:
            asked = dataclasses.replace(task, cancel_reason=task.cancel_reason or reason)
            self._tasks[task_id] = asked
            for subscription in tuple(self._runs.get(task.run_id, _RunTasks()).listeners):
                try:
                    subscription.listener.on_task_cancel(task_id)
                except Exception:
                    logger.exception("task listener of run %s failed", task.run_id)
            return asked
        cancelled = dataclasses.replace(
            task,
            status=TaskStatus.CANCELLED,
            error=reason,
            cancel_reason=reason,
            update_time_ms=_now_ms(),
        )
        self._queue.pop(task_id, None)
        self._record(cancelled, log_entry(cancelled, TaskStatus.CANCELLED, message=reason))
        return cancelled

    async def retry_task(self, task_id: str) -> TaskRecord:
        task = self._get(task_id)
        if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            raise TaskNotRetryable(task_id, task.status.value)
        queued = dataclasses.replace(
            task,
            status=TaskStatus.QUEUED,
            failures=0,
            error="",
            result_json="",
            cancel_reason="",
            not_before_ms=0,
            progress=0.0,
            update_time_ms=_now_ms(),
        )
        self._queue[task_id] = queued.update_time_ms
        self._record(queued, log_entry(queued, TaskStatus.QUEUED))
        return queued

    async def run_tasks(self, run_id: str) -> list[TaskRecord]:
        return [t for t in self._tasks.values() if t.run_id == run_id and self._log.has_run(run_id)]

    async def lapsed(self, limit: int) -> list[str]:
        found = [
            task.task_id
            for task in self._tasks.values()
            if task.status is TaskStatus.RUNNING
            and not self._lease_held(task.task_id)
            and self._log.has_run(task.run_id)
        ][:limit]
        for task_id in found:
            self._queue.setdefault(task_id, _now_ms())
        return found

    async def close(self) -> None:
        self._runs.clear()

    # Helpers.

    def _record(self, task: TaskRecord, entry: bytes) -> None:
        """Store the task's new state and log the change, then ring its run's doorbell."""
        self._tasks[task.task_id] = task
        tasks = self._runs.setdefault(task.run_id, _RunTasks())
        tasks.log.append(entry)
        for subscription in tuple(tasks.listeners):
            try:
                subscription.listener.on_task_log()
            except Exception:
                logger.exception("task listener of run %s failed", task.run_id)

    def _find(self, task_id: str) -> TaskRecord | None:
        task = self._tasks.get(task_id)
        if task is not None and not self._log.has_run(task.run_id):
            # The run's retention passed: its tasks go with it.
            del self._tasks[task_id]
            self._queue.pop(task_id, None)
            self._runs.pop(task.run_id, None)
            return None
        return task

    def _get(self, task_id: str) -> TaskRecord:
        task = self._find(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def _running(self, task_id: str, epoch: int) -> TaskRecord:
        task = self._get(task_id)
        if task.epoch != epoch or task.status is not TaskStatus.RUNNING:
            raise StaleEpoch(task_id, epoch, task.epoch)
        return task

    def _lease_held(self, task_id: str) -> bool:
        deadline = self._leases.get(task_id)
        return deadline is not None and self._clock() <= deadline
