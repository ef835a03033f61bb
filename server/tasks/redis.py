"""RedisTaskStore: the TaskStore on Redis, beside a RedisEventLog, shared by every server.

A task's record and lease, and its run's task ids and task log, live in the
run's slot (server/events/keys.py); each change is one script of scripts.py.
The runner's shared keys (queue, slots, running set, index) live under one
hash tag of their own and are written after the task's script, as the run
index and active set are: a task is added to the queue before its script
too, so a crash between the two steps cannot strand it, and every reader
drops the members it finds stale.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

from server.errors import StaleEpoch, TaskNotFound, TaskNotRetryable
from server.events.keys import Keys, run_index_member
from server.events.log import Subscription
from server.events.redis import RedisEventLog
from server.events.redis_client import AnyFanout, RedisClient, register
from server.events.redis_records import flatten, pairs, store_errors, walk_index
from server.tasks import scripts
from server.tasks.records import TaskPageCursor, TaskRecord, TaskStatus, run_id_of
from server.tasks.store import Renewal, Slot, TaskDoorbell, TaskListener

# The fields of a task's hash: the names of TaskRecord's fields.
_FIELDS = list(TaskRecord.__dataclass_fields__)
_FIELD_BYTES = [name.encode() for name in _FIELDS]
_SCAN_BATCH = 200


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fields(task: TaskRecord) -> dict[str, str | int | bytes]:
    values: dict[str, str | int | bytes] = {}
    for name in _FIELDS:
        value = getattr(task, name)
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = repr(value)
        values[name] = value
    return values


def _task(fields: Mapping[bytes, bytes]) -> TaskRecord:
    text = {
        name: fields.get(raw, b"").decode() for name, raw in zip(_FIELDS, _FIELD_BYTES, strict=True)
    }
    return TaskRecord(
        task_id=text["task_id"],
        run_id=text["run_id"],
        agent_id=text["agent_id"],
        tool_name=text["tool_name"],
        tool_call_id=text["tool_call_id"],
        args_json=text["args_json"],
        status=TaskStatus(text["status"]),
        create_time_ms=int(text["create_time_ms"] or 0),
        update_time_ms=int(text["update_time_ms"] or 0),
        timeout_s=float(text["timeout_s"] or 0),
        max_retries=int(text["max_retries"] or 0),
        attempt=int(text["attempt"] or 0),
        failures=int(text["failures"] or 0),
        progress=float(text["progress"] or 0),
        result_json=text["result_json"],
        error=text["error"],
        epoch=int(text["epoch"] or 0),
        owner=text["owner"],
        not_before_ms=int(text["not_before_ms"] or 0),
        cancel_reason=text["cancel_reason"],
        thread_id=text["thread_id"],
        until_idle=text["until_idle"] == "1",
        tenant=text["tenant"],
    )


class RedisTaskStore:
    """A TaskStore on Redis; create it with `RedisTaskStore.beside(log, ...)`."""

    def __init__(
        self,
        client: RedisClient,
        fanout: AnyFanout,
        keys: Keys,
        *,
        lease_ttl_s: float,
        thread_idle_ttl_ms: int,
    ) -> None:
        self._client = client
        self._fanout = fanout
        self._keys = keys
        self._lease_ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._thread_idle_ttl_ms = thread_idle_ttl_ms
        self._create = register(client, scripts.CREATE)
        self._start = register(client, scripts.START)
        self._renew = register(client, scripts.RENEW)
        self._progress = register(client, scripts.PROGRESS)
        self._finish = register(client, scripts.FINISH)
        self._cancel = register(client, scripts.CANCEL)
        self._retry = register(client, scripts.RETRY)
        self._acquire = register(client, scripts.ACQUIRE_SLOT)

    @classmethod
    def beside(cls, log: RedisEventLog, *, lease_ttl_s: float) -> RedisTaskStore:
        """A store sharing `log`'s connections (the log closes them)."""
        return cls(
            log.client,
            log.fanout,
            log.keys,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_ms=log.thread_idle_ttl_ms,
        )

    async def create_task(self, task: TaskRecord) -> tuple[TaskRecord, bool]:
        keys = self._keys
        run_id = task.run_id
        member = run_index_member(task.create_time_ms, task.task_id)
        with store_errors():
            await self._client.zadd(keys.task_queue, {task.task_id: task.create_time_ms}, nx=True)
            reply = await self._create(
                keys=[keys.task(task.task_id), keys.run_tasks(run_id), keys.task_log(run_id),
                      keys.run(run_id)],
                args=[keys.task_events(run_id), task.task_id, *flatten(_fields(task))],
            )  # fmt: skip
            created = reply[0] == 1
            stored = task if created else _task(pairs(reply[1]))
            async with self._client.pipeline(transaction=False) as pipe:
                if not stored.status.ended and stored.status is not TaskStatus.RUNNING:
                    pipe.zadd(keys.task_queue, {task.task_id: stored.create_time_ms}, nx=True)
                pipe.zadd(keys.task_index, {member: 0}, nx=True)
                await pipe.execute()
        return stored, created

    async def get_task(self, task_id: str) -> TaskRecord:
        if not run_id_of(task_id):
            raise TaskNotFound(task_id)
        with store_errors():
            fields = cast(dict[bytes, bytes], await self._client.hgetall(self._keys.task(task_id)))
        if not fields:
            raise TaskNotFound(task_id)
        return _task(fields)

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

        def matches(task: TaskRecord) -> bool:
            return (
                (not agent_id or task.agent_id == agent_id)
                and (not statuses or task.status in statuses)
                and (tenant is None or task.tenant == tenant)
            )

        cursor = None if after is None else (after.create_time_ms, after.task_id)
        if run_id:
            # One run's tasks: few, read at once and ordered here.
            tasks = [t for t in await self.run_tasks(run_id) if matches(t)]
            tasks.sort(key=lambda t: (t.create_time_ms, t.task_id), reverse=True)
            return [t for t in tasks if cursor is None or (t.create_time_ms, t.task_id) < cursor][
                :limit
            ]

        def accept(task_id: str, _: int, fields: dict[bytes, bytes]) -> TaskRecord | None:
            task = _task(fields)
            return task if matches(task) else None

        return await walk_index(
            self._client,
            self._keys.task_index,
            limit=limit,
            after=cursor,
            hash_key=self._keys.task,
            fields=_FIELDS,
            accept=accept,
        )

    async def task_log(self, run_id: str, start: int) -> list[bytes]:
        with store_errors():
            return cast(
                list[bytes], await self._client.lrange(self._keys.task_log(run_id), start, -1)
            )

    async def subscribe_tasks(self, run_id: str, listener: TaskListener) -> Subscription:
        return await self._fanout.subscribe_control(
            self._keys.task_events(run_id), TaskDoorbell(listener)
        )

    async def due(self, limit: int) -> list[str]:
        with store_errors():
            members = await self._client.zrangebyscore(
                self._keys.task_queue, "-inf", _now_ms(), start=0, num=limit
            )
        return [member.decode() for member in cast(list[bytes], members)]

    async def acquire_slot(
        self, task_id: str, agent_id: str, *, global_limit: int, agent_limit: int
    ) -> Slot:
        now = _now_ms()
        with store_errors():
            held = await self._acquire(
                keys=[self._keys.task_slots, self._keys.agent_task_slots(agent_id)],
                args=[task_id, now, now + self._lease_ttl_ms, global_limit, agent_limit],
            )
        return {1: Slot.HELD, 0: Slot.FULL}.get(int(held), Slot.AGENT_FULL)

    async def renew_slot(self, task_id: str, agent_id: str) -> None:
        until = _now_ms() + self._lease_ttl_ms
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._keys.task_slots, {task_id: until}, xx=True)
                pipe.zadd(self._keys.agent_task_slots(agent_id), {task_id: until}, xx=True)
                await pipe.execute()

    async def release_slot(self, task_id: str, agent_id: str) -> None:
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._keys.task_slots, task_id)
                pipe.zrem(self._keys.agent_task_slots(agent_id), task_id)
                await pipe.execute()

    async def start_task(self, task_id: str, owner: str) -> TaskRecord | None:
        run_id = run_id_of(task_id)
        keys = self._keys
        with store_errors():
            reply = await self._start(
                keys=[keys.task(task_id), keys.task_lease(task_id), keys.task_log(run_id)],
                args=[keys.task_events(run_id), owner, self._lease_ttl_ms, _now_ms()],
            )
            code = reply[0]
            if code == scripts.OK:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.sadd(keys.running_tasks, task_id)
                    pipe.zrem(keys.task_queue, task_id)
                    await pipe.execute()
            elif code in (scripts.NOT_FOUND, scripts.ENDED):
                await self._client.zrem(keys.task_queue, task_id)
        return _task(pairs(reply[1])) if code == scripts.OK else None

    async def renew_task(self, task_id: str, epoch: int) -> Renewal:
        with store_errors():
            reply = await self._renew(
                keys=[self._keys.task(task_id), self._keys.task_lease(task_id)],
                args=[epoch, self._lease_ttl_ms],
            )
        if reply[0] == scripts.OK:
            return Renewal.RENEWED
        if reply[0] == scripts.CANCEL_REQUESTED:
            return Renewal.CANCEL_REQUESTED
        return Renewal.LOST

    async def report_progress(
        self, task_id: str, epoch: int, progress: float, message: str
    ) -> None:
        run_id = run_id_of(task_id)
        with store_errors():
            reply = await self._progress(
                keys=[self._keys.task(task_id), self._keys.task_log(run_id)],
                args=[self._keys.task_events(run_id), epoch, repr(progress), message, _now_ms()],
            )
        if reply[0] != scripts.OK:
            raise StaleEpoch(task_id, epoch, int(reply[1]))

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
        run_id = run_id_of(task_id)
        keys = self._keys
        task_keys = [keys.task(task_id), keys.task_lease(task_id), keys.task_log(run_id),
                     keys.run(run_id)]  # fmt: skip
        thread_id, on_thread, _ = run_id.partition(":")
        if thread_entry and on_thread:
            task_keys.extend(keys.thread_keys(thread_id))
        args: list[Any] = [
            keys.task_events(run_id),
            epoch,
            status.value,
            result_json,
            error,
            retry_at_ms,
            _now_ms(),
            thread_entry if on_thread else b"",
            self._thread_idle_ttl_ms,
        ]
        with store_errors():
            reply = await self._finish(keys=task_keys, args=args)
            if reply[0] == scripts.OK:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.srem(keys.running_tasks, task_id)
                    if status is TaskStatus.RETRYING:
                        pipe.zadd(keys.task_queue, {task_id: retry_at_ms})
                    await pipe.execute()
        if reply[0] != scripts.OK:
            raise StaleEpoch(task_id, epoch, int(reply[1]))
        return _task(pairs(reply[1]))

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        run_id = run_id_of(task_id)
        if not run_id:
            raise TaskNotFound(task_id)
        keys = self._keys
        with store_errors():
            reply = await self._cancel(
                keys=[keys.task(task_id), keys.task_log(run_id)],
                args=[keys.task_events(run_id), reason, _now_ms(), task_id],
            )
            if reply[0] == scripts.NOT_FOUND:
                raise TaskNotFound(task_id)
            task = _task(pairs(reply[1]))
            if task.status.ended:
                await self._client.zrem(keys.task_queue, task_id)
        return task

    async def retry_task(self, task_id: str) -> TaskRecord:
        run_id = run_id_of(task_id)
        if not run_id:
            raise TaskNotFound(task_id)
        keys = self._keys
        with store_errors():
            reply = await self._retry(
                keys=[keys.task(task_id), keys.task_log(run_id)],
                args=[keys.task_events(run_id), _now_ms()],
            )
            if reply[0] == scripts.OK:
                await self._client.zadd(keys.task_queue, {task_id: _now_ms()})
        if reply[0] == scripts.NOT_FOUND:
            raise TaskNotFound(task_id)
        if reply[0] == scripts.NOT_RETRYABLE:
            raise TaskNotRetryable(task_id, reply[1].decode())
        return _task(pairs(reply[1]))

    async def run_tasks(self, run_id: str) -> list[TaskRecord]:
        with store_errors():
            ids = cast(set[bytes], await self._client.smembers(self._keys.run_tasks(run_id)))
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hgetall(self._keys.task(task_id.decode()))
                rows: list[dict[bytes, bytes]] = await pipe.execute()
        return [_task(row) for row in rows if row]

    async def lapsed(self, limit: int) -> list[str]:
        """Walk the running set: RUNNING without a lease is lapsed (queued again); not
        RUNNING or gone is stale (dropped)."""
        keys = self._keys
        found: list[str] = []
        stale: list[bytes] = []
        cursor = 0
        with store_errors():
            while len(found) < limit:
                cursor, batch = await self._client.sscan(
                    keys.running_tasks, cursor, count=_SCAN_BATCH
                )
                members = cast(list[bytes], batch)
                async with self._client.pipeline(transaction=False) as pipe:
                    for member in members:
                        pipe.hget(keys.task(member.decode()), "status")
                        pipe.exists(keys.task_lease(member.decode()))
                    replies: list[Any] = await pipe.execute()
                for member, status, leased in zip(
                    members, replies[::2], replies[1::2], strict=True
                ):
                    if status != b"running":
                        stale.append(member)
                    elif not leased and len(found) < limit:
                        found.append(member.decode())
                if cursor == 0:
                    break
            if stale:
                await self._client.srem(keys.running_tasks, *stale)
            if found:
                await self._client.zadd(keys.task_queue, dict.fromkeys(found, _now_ms()), nx=True)
        return found

    async def close(self) -> None:
        """The log owns the connections."""
