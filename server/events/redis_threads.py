"""The thread side of RedisEventLog: conversations and the runs made on them.

A thread's keys and its runs' keys share the thread's hash tag (keys.py), so
starting a run on a thread is one script (START_THREAD_RUN) that decides
against the thread's state, and a run's terminal append (in redis.py)
updates the thread in the same script as its own record.

Outside the thread's slot live the thread indexes (all threads, and each
resource's) and the active set; they are written after the scripts, as for
runs. A run that must later become runnable without a script of ours in
between (a queued run promoted by another run's terminal append) is added to
the active set before its script as well as after, so a crash between the
two steps cannot leave it out.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

from server.errors import ThreadBusy, ThreadNotFound
from server.events import scripts
from server.events.keys import Keys, ThreadField, run_index_member
from server.events.log import (
    BusyPolicy,
    RunRecord,
    RunState,
    ThreadPageCursor,
    ThreadRecord,
    ThreadRunStart,
)
from server.events.redis_client import RedisClient, register
from server.events.redis_records import (
    flatten,
    pairs,
    run_fields,
    run_from_hash,
    store_errors,
    thread_fields,
    thread_from_hash,
    walk_index,
)

# What list_threads reads of each thread.
_LISTED_FIELDS = [field.value for field in ThreadField]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisThreads:
    """Threads on Redis; RedisEventLog delegates its thread methods here."""

    def __init__(
        self, client: RedisClient, keys: Keys, *, lease_ttl_ms: int, thread_idle_ttl_ms: int
    ) -> None:
        self._client = client
        self._keys = keys
        self._lease_ttl_ms = lease_ttl_ms
        self._idle_ttl_ms = thread_idle_ttl_ms
        self._create = register(client, scripts.CREATE_THREAD)
        self._get = register(client, scripts.GET_THREAD)
        self._messages = register(client, scripts.THREAD_MESSAGES)
        self._delete = register(client, scripts.DELETE_THREAD)
        self._start = register(client, scripts.START_THREAD_RUN)

    async def create_thread(self, record: ThreadRecord) -> tuple[ThreadRecord, bool]:
        thread_id = record.thread_id
        with store_errors():
            reply = await self._create(
                keys=[self._keys.thread(thread_id)],
                args=[self._idle_ttl_ms, *flatten(thread_fields(record))],
            )
            if reply[0] == 1:
                stored, created = record, True
            else:
                stored, created = thread_from_hash(thread_id, pairs(reply[1])), False
            # Outside the script: the indexes are not in the thread's slot. Also
            # done when the thread existed, to heal a crash between the two steps.
            member = run_index_member(stored.create_time_ms, thread_id)
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._keys.thread_index, {member: 0}, nx=True)
                if stored.resource_id:
                    pipe.zadd(self._keys.resource_threads(stored.resource_id), {member: 0}, nx=True)
                await pipe.execute()
        return stored, created

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        with store_errors():
            reply = await self._get(keys=list(self._keys.thread_keys(thread_id)), args=[])
        if reply[0] == scripts.NOT_FOUND:
            raise ThreadNotFound(thread_id)
        queued = tuple(run_id.decode() for run_id in reply[2])
        return thread_from_hash(thread_id, pairs(reply[1]), queued, int(reply[3]))

    async def list_threads(
        self,
        *,
        resource_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: ThreadPageCursor | None = None,
    ) -> list[ThreadRecord]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        index = self._keys.resource_threads(resource_id) if resource_id else self._keys.thread_index

        def accept(thread_id: str, _: int, fields: dict[bytes, bytes]) -> ThreadRecord | None:
            thread = thread_from_hash(thread_id, fields)
            return thread if tenant is None or thread.owner == tenant else None

        page = await walk_index(
            self._client,
            index,
            limit=limit,
            after=None if after is None else (after.create_time_ms, after.thread_id),
            hash_key=self._keys.thread,
            fields=_LISTED_FIELDS,
            accept=accept,
        )
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for thread in page:
                    pipe.lrange(self._keys.thread_queue(thread.thread_id), 0, -1)
                    pipe.llen(self._keys.thread_messages(thread.thread_id))
                replies: list[Any] = await pipe.execute()
        return [
            dataclasses.replace(
                thread,
                queued_run_ids=tuple(run_id.decode() for run_id in queued),
                message_count=int(count),
            )
            for thread, queued, count in zip(page, replies[::2], replies[1::2], strict=True)
        ]

    async def delete_thread(self, thread_id: str) -> None:
        with store_errors():
            reply = await self._delete(keys=list(self._keys.thread_keys(thread_id)), args=[])
            if reply[0] == scripts.OK:
                member = run_index_member(int(reply[1]), thread_id)
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.zrem(self._keys.thread_index, member)
                    if reply[2]:
                        pipe.zrem(self._keys.resource_threads(reply[2].decode()), member)
                    await pipe.execute()
        if reply[0] == scripts.NOT_FOUND:
            raise ThreadNotFound(thread_id)
        if reply[0] == scripts.BUSY:
            raise ThreadBusy(thread_id, reply[1].decode())

    async def thread_messages(self, thread_id: str, start: int, stop: int) -> list[bytes]:
        if start < 0 or stop < start:
            raise ValueError(f"bad range [{start}, {stop})")
        if stop == start:
            await self.get_thread(thread_id)  # still NOT_FOUND for an unknown thread
            return []
        with store_errors():
            reply = await self._messages(
                keys=[self._keys.thread(thread_id), self._keys.thread_messages(thread_id)],
                args=[start, stop - 1],
            )
        if reply[0] == scripts.NOT_FOUND:
            raise ThreadNotFound(thread_id)
        return cast(list[bytes], reply[1])

    async def start_thread_run(self, record: RunRecord, policy: BusyPolicy) -> ThreadRunStart:
        """The START_THREAD_RUN script, with the active set and the run index around it.

        1. Add the new run to the active set first: if it ends up queued, the
           run that later makes it runnable does so in a script, with nothing
           after it to add the run.
        2. For INTERRUPT and ROLLBACK, add the thread's active run too: a
           suspended one becomes runnable (to write its abort) in the script.
        3. Run the script; then add the runs again (a sweep between 1 and 3
           may have dropped them as not yet runnable), and the new run to the
           run index.
        """
        run_id, thread_id = record.run_id, record.thread_id
        thread_keys = self._keys.thread_keys(thread_id)
        now = _now_ms()
        member = run_index_member(record.create_time_ms, run_id)
        interrupting = policy in (BusyPolicy.INTERRUPT, BusyPolicy.ROLLBACK)
        verb = "rolled back" if policy is BusyPolicy.ROLLBACK else "interrupted"
        args: list[Any] = [
            policy.value,
            self._lease_ttl_ms,
            record.epoch,
            self._keys.thread_base(thread_id),
            thread_id,
            member,
            now,
            run_id,
            f"{verb} by run {run_id}",
            *flatten(run_fields(record)),
        ]
        with store_errors():
            early = [run_id]
            if interrupting:
                active = cast(
                    bytes | None,
                    await self._client.hget(self._keys.thread(thread_id), "active_run_id"),
                )
                if active:
                    early.append(active.decode())
            await self._client.sadd(self._keys.active_runs, *early)
            reply = await self._start(
                keys=[*thread_keys, self._keys.run(run_id), self._keys.lease(run_id)], args=args
            )
            code = reply[0]
            stored = run_from_hash(run_id, pairs(reply[1])) if code == scripts.EXISTS else record
            if code in (scripts.OK, scripts.EXISTS):
                late = [run_id, *(r.decode() for r in reply[2:3])]
                member = run_index_member(stored.create_time_ms, run_id)
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.sadd(self._keys.active_runs, *late)
                    pipe.zadd(self._keys.run_index, {member: 0}, nx=True)
                    await pipe.execute()
            else:
                await self._client.srem(self._keys.active_runs, run_id)
        if code == scripts.NOT_FOUND:
            raise ThreadNotFound(thread_id)
        if code == scripts.BUSY:
            raise ThreadBusy(thread_id, reply[1].decode())
        if code == scripts.EXISTS:
            return ThreadRunStart(stored, created=False)
        if reply[1] == b"active":
            return ThreadRunStart(record, created=True)
        interrupted = reply[2].decode() if len(reply) > 2 else ""
        enqueued = dataclasses.replace(record, state=RunState.ENQUEUED, owner="")
        return ThreadRunStart(enqueued, created=True, interrupted_run_id=interrupted)
