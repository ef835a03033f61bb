"""PostgresTaskStore: the TaskStore on PostgreSQL, beside a PostgresEventLog, shared by
every server.

A task is a row of `tasks` (its record's fields, its lease, its place in the
queue), its run's task log is rows of `task_log`, and the slots are rows of
`task_slots`; server/events/sql.py (TASK_) has every statement and says how the tables hang
together. What a Lua script does on Redis is one transaction here: the
task's row is locked (SELECT ... FOR UPDATE), the checks and the new state
are computed from it (the same steps as the memory store's), and the row,
the log entry and the doorbell are written before the commit. The queue and
the running set are columns of the task's row, so they change in the same
transaction (Redis writes them in a second step and lets readers drop
stale members). Leases, slot holds and "due" compare with the database's
clock, never the instance's.

The doorbells travel on the log's one NOTIFY channel (pg_fanout.py), as
control notifications under a key of their own, "tasks#<run id>" (not a run
id: the log's listeners of the run never see them), so the log's one LISTEN
connection per process hands them to the run's TaskListeners: "log" when
the task log grew, "cancel:<task id>" for a running task's runner. NOTIFY is
sent at commit, so an entry is always readable when its doorbell rings. A
lost notification costs latency only: the log is read from the reader's
position, and a cancel request is kept in the task's row, which the
runner's next renewal reads (Renewal.CANCEL_REQUESTED).

A task's rows go with its run: they reference the run's row ON DELETE
CASCADE, so the log's sweep deletes them, and until it does every read joins
the run and treats one past its retention as gone (as the log's reads do).
A task is not created for a run that is gone (RunNotFound).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from server.errors import RunNotFound, StaleEpoch, TaskNotFound, TaskNotRetryable
from server.events import sql
from server.events.log import Subscription
from server.events.pg_fanout import PgFanout
from server.events.postgres import PostgresEventLog
from server.events.postgres_records import store_errors
from server.tasks.records import TaskPageCursor, TaskRecord, TaskStatus, log_entry
from server.tasks.store import Renewal, Slot, TaskDoorbell, TaskListener


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _task(row: Sequence[Any]) -> TaskRecord:
    """A TaskRecord from a row of sql.TASK_COLUMNS."""
    return TaskRecord(
        task_id=row[0],
        run_id=row[1],
        agent_id=row[2],
        tool_name=row[3],
        tool_call_id=row[4],
        args_json=row[5],
        status=TaskStatus(row[6]),
        create_time_ms=row[7],
        update_time_ms=row[8],
        timeout_s=row[9],
        max_retries=row[10],
        attempt=row[11],
        failures=row[12],
        progress=row[13],
        result_json=row[14],
        error=row[15],
        epoch=row[16],
        owner=row[17],
        not_before_ms=row[18],
        cancel_reason=row[19],
        thread_id=row[20],
        until_idle=row[21],
        tenant=row[22],
    )


@dataclasses.dataclass(slots=True)
class _Locked:
    """A task's row, locked by the transaction: the task, its lease, its place in the
    queue, and the database's clock."""

    task: TaskRecord
    leased: bool
    queued_ms: int | None
    now_ms: int


def channel_key(run_id: str) -> str:
    """The key a run's task doorbells travel under on the log's channel: not a run id
    (run ids never contain "#"), so the log's listeners of the run never see them."""
    return f"tasks#{run_id}"


def doorbell_payload(run_id: str, message: str) -> str:
    """A control notification of the log's fanout (pg_fanout.py: "c<len>:<key><rest>")
    whose rest is `message`: "log", or "cancel:<task id>"."""
    key = channel_key(run_id)
    return f"c{len(key)}:{key}{message}"


class PostgresTaskStore:
    """A TaskStore on PostgreSQL; create it with `PostgresTaskStore.beside(log, ...)`."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        fanout: PgFanout,
        *,
        lease_ttl_s: float,
        thread_idle_ttl_ms: int,
    ) -> None:
        self._pool = pool
        self._fanout = fanout
        self._lease_ms = max(1, round(lease_ttl_s * 1000))
        self._thread_idle_ttl_ms = thread_idle_ttl_ms

    @classmethod
    def beside(cls, log: PostgresEventLog, *, lease_ttl_s: float) -> PostgresTaskStore:
        """A store sharing `log`'s pool and notifications (the log closes them)."""
        return cls(
            log.pool,
            log.fanout,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_ms=log.thread_idle_ttl_ms,
        )

    async def create_task(self, task: TaskRecord) -> tuple[TaskRecord, bool]:
        params = {c: getattr(task, c) for c in sql.TASK_COLUMNS}
        params["status"] = task.status.value
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                run = await (await conn.execute(sql.TASK_LOCK_RUN, params)).fetchone()
                if run is None:
                    raise RunNotFound(task.run_id)
                made = await (await conn.execute(sql.TASK_CREATE, params)).fetchone()
                if made is None:  # its id exists (and stays: its run's row is locked)
                    existing = await (await conn.execute(sql.TASK_GET, params)).fetchone()
                    if existing is None:
                        raise TaskNotFound(task.task_id)
                    return _task(existing), False
                await self._log(conn, task, log_entry(task, TaskStatus.QUEUED))
        return task, True

    async def get_task(self, task_id: str) -> TaskRecord:
        with store_errors():
            async with self._pool.connection() as conn:
                row = await (await conn.execute(sql.TASK_GET, {"task_id": task_id})).fetchone()
        if row is None:
            raise TaskNotFound(task_id)
        return _task(row)

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
        params = {
            "after_ms": None if after is None else after.create_time_ms,
            "after_id": None if after is None else after.task_id,
            "run_id": run_id,
            "agent_id": agent_id,
            "tenant": tenant,
            "statuses": sorted(status.value for status in statuses),
            "limit": limit,
        }
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.TASK_LIST, params)).fetchall()
        return [_task(row) for row in rows]

    async def task_log(self, run_id: str, start: int) -> list[bytes]:
        params = {"run_id": run_id, "start": max(0, start)}
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.TASK_LOG_ENTRIES, params)).fetchall()
        return [bytes(row[0]) for row in rows]

    async def subscribe_tasks(self, run_id: str, listener: TaskListener) -> Subscription:
        return await self._fanout.subscribe_control(channel_key(run_id), TaskDoorbell(listener))

    async def due(self, limit: int) -> list[str]:
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.TASK_DUE, {"limit": limit})).fetchall()
        return [str(row[0]) for row in rows]

    async def acquire_slot(
        self, task_id: str, agent_id: str, *, global_limit: int, agent_limit: int
    ) -> Slot:
        params = {
            "task_id": task_id,
            "agent_id": agent_id,
            "global_limit": global_limit,
            "agent_limit": agent_limit,
            "lease_ms": self._lease_ms,
        }
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(sql.TASK_LOCK_SLOTS)
                await conn.execute(sql.TASK_DROP_LAPSED_SLOTS)
                row = await (await conn.execute(sql.TASK_ACQUIRE_SLOT, params)).fetchone()
        held = 0 if row is None else int(row[0])
        return {1: Slot.HELD, 0: Slot.FULL}.get(held, Slot.AGENT_FULL)

    async def renew_slot(self, task_id: str, agent_id: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn:
                await conn.execute(
                    sql.TASK_RENEW_SLOT, {"task_id": task_id, "lease_ms": self._lease_ms}
                )

    async def release_slot(self, task_id: str, agent_id: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn:
                await conn.execute(sql.TASK_RELEASE_SLOT, {"task_id": task_id})

    async def start_task(self, task_id: str, owner: str) -> TaskRecord | None:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                locked = await self._lock(conn, task_id)
                if locked is None:
                    return None
                task = locked.task
                if task.status.ended:
                    await self._save(conn, task, lease="keep", queued_ms=None)  # leaves the queue
                    return None
                if task.status is TaskStatus.RUNNING and locked.leased:
                    return None
                if task.status is TaskStatus.RETRYING and task.not_before_ms > locked.now_ms:
                    return None
                started = dataclasses.replace(
                    task,
                    status=TaskStatus.RUNNING,
                    attempt=task.attempt + 1,
                    epoch=task.epoch + 1,
                    owner=owner,
                    update_time_ms=_now_ms(),
                )
                await self._save(conn, started, lease="take", queued_ms=None)
                await self._log(conn, started, log_entry(started, TaskStatus.RUNNING))
        return started

    async def renew_task(self, task_id: str, epoch: int) -> Renewal:
        params = {"task_id": task_id, "epoch": epoch, "lease_ms": self._lease_ms}
        with store_errors():
            async with self._pool.connection() as conn:
                row = await (await conn.execute(sql.TASK_RENEW, params)).fetchone()
        if row is None:
            return Renewal.LOST
        return Renewal.CANCEL_REQUESTED if row[0] else Renewal.RENEWED

    async def report_progress(
        self, task_id: str, epoch: int, progress: float, message: str
    ) -> None:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                locked = await self._running(conn, task_id, epoch)
                updated = dataclasses.replace(
                    locked.task, progress=progress, update_time_ms=_now_ms()
                )
                await self._save(conn, updated, lease="keep", queued_ms=locked.queued_ms)
                entry = log_entry(updated, "progress", progress=progress, message=message)
                await self._log(conn, updated, entry)

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
        retrying = status is TaskStatus.RETRYING
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                task = (await self._running(conn, task_id, epoch)).task
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
                await self._save(
                    conn, finished, lease="drop", queued_ms=retry_at_ms if retrying else None
                )
                entry = log_entry(
                    finished,
                    status,
                    attempt=task.attempt + 1 if retrying else task.attempt,
                    progress=finished.progress,
                    message=error,
                    result_json=result_json,
                )
                await self._log(conn, finished, entry)
                late = status in (TaskStatus.COMPLETED, TaskStatus.FAILED)
                if late and task.thread_id and not task.until_idle and thread_entry:
                    await conn.execute(
                        sql.TASK_ADD_TO_THREAD,
                        {"thread_id": task.thread_id, "entry": thread_entry,
                         "idle_ttl_ms": self._thread_idle_ttl_ms},
                    )  # fmt: skip
        return finished

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                locked = await self._lock(conn, task_id)
                if locked is None:
                    raise TaskNotFound(task_id)
                task = locked.task
                if task.status.ended:
                    return task
                reason = task.cancel_reason or reason  # the first request's reason stays
                if task.status is TaskStatus.RUNNING:
                    asked = dataclasses.replace(task, cancel_reason=reason)
                    await self._save(conn, asked, lease="keep", queued_ms=locked.queued_ms)
                    await self._notify(conn, task.run_id, f"cancel:{task_id}")  # its runner
                    return asked
                cancelled = dataclasses.replace(
                    task,
                    status=TaskStatus.CANCELLED,
                    error=reason,
                    cancel_reason=reason,
                    update_time_ms=_now_ms(),
                )
                await self._save(conn, cancelled, lease="keep", queued_ms=None)
                entry = log_entry(cancelled, TaskStatus.CANCELLED, message=reason)
                await self._log(conn, cancelled, entry)
        return cancelled

    async def retry_task(self, task_id: str) -> TaskRecord:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                locked = await self._lock(conn, task_id)
                if locked is None:
                    raise TaskNotFound(task_id)
                task = locked.task
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
                await self._save(conn, queued, lease="keep", queued_ms=locked.now_ms)
                await self._log(conn, queued, log_entry(queued, TaskStatus.QUEUED))
        return queued

    async def run_tasks(self, run_id: str) -> list[TaskRecord]:
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.TASK_RUN_TASKS, {"run_id": run_id})).fetchall()
        return [_task(row) for row in rows]

    async def lapsed(self, limit: int) -> list[str]:
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.TASK_LAPSED, {"limit": limit})).fetchall()
        return [str(row[0]) for row in rows]

    async def close(self) -> None:
        """The log owns the pool and the notifications."""

    # Steps of a transaction (the caller holds the connection in one).

    async def _lock(self, conn: AsyncConnection[Any], task_id: str) -> _Locked | None:
        row = await (await conn.execute(sql.TASK_LOCK, {"task_id": task_id})).fetchone()
        if row is None:
            return None
        width = len(sql.TASK_COLUMNS)
        return _Locked(_task(row), bool(row[width]), row[width + 1], int(row[width + 2]))

    async def _running(self, conn: AsyncConnection[Any], task_id: str, epoch: int) -> _Locked:
        """The task's attempt at `epoch`, locked; StaleEpoch if that attempt is over."""
        locked = await self._lock(conn, task_id)
        if locked is None:
            raise StaleEpoch(task_id, epoch, 0)
        if locked.task.epoch != epoch or locked.task.status is not TaskStatus.RUNNING:
            raise StaleEpoch(task_id, epoch, locked.task.epoch)
        return locked

    async def _save(
        self, conn: AsyncConnection[Any], task: TaskRecord, *, lease: str, queued_ms: int | None
    ) -> None:
        await conn.execute(
            sql.TASK_SAVE,
            {
                "task_id": task.task_id,
                "status": task.status.value,
                "attempt": task.attempt,
                "failures": task.failures,
                "progress": task.progress,
                "result_json": task.result_json,
                "error": task.error,
                "epoch": task.epoch,
                "owner": task.owner,
                "not_before_ms": task.not_before_ms,
                "cancel_reason": task.cancel_reason,
                "update_time_ms": task.update_time_ms,
                "lease": lease,
                "lease_ms": self._lease_ms,
                "queued_ms": queued_ms,
            },
        )

    async def _log(self, conn: AsyncConnection[Any], task: TaskRecord, entry: bytes) -> None:
        """Append `entry` to the run's task log and ring its doorbell (at commit)."""
        await conn.execute(sql.TASK_APPEND_LOG, {"run_id": task.run_id, "entry": entry})
        await self._notify(conn, task.run_id, "log")

    async def _notify(self, conn: AsyncConnection[Any], run_id: str, message: str) -> None:
        payload = doorbell_payload(run_id, message)
        await conn.execute(sql.TASK_NOTIFY, {"channel": self._fanout.channel, "payload": payload})
