"""RedisEventLog: the EventLog on Redis, shared by every Keel replica.

Each write is one Lua script on one run's keys (scripts.py), so it is atomic
and one round trip; the key layout is in keys.py. Live notifications travel
over one pub/sub connection per process (fanout.py): each append publishes
a serialized EventBatch of its events. An append that only changes the
state publishes nothing, since listeners learn about runs from events.
Cancel requests travel over the same connection, on each run's control
channel.

Ownership: a run's lease is a key holding the owner's epoch that expires
by itself (PX = lease_ttl_s). The active set (keys.py) lists the runs that
may need an owner, so claimable need not walk every run: a write that makes
a run runnable adds it after its script commits, and claimable drops the
members it finds suspended, ended or gone.

Redis connection and timeout errors surface as StoreUnavailable. Commands
are not retried on connection errors (a retried increment could count
twice); append and create_run are safe for the caller to retry, because an
exact replay of a committed batch is a no-op and creation is idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

from keel.v1.agent_service_pb2 import AgentEvent
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.errors import (
    ConcurrentModification,
    IndexConflict,
    OffsetExpired,
    RunNotFound,
    RunNotResumable,
    StaleEpoch,
)
from server.events import scripts
from server.events.batcher import ScriptBatcher
from server.events.codec import Batch, check_consecutive, encode_batch, serialize_events
from server.events.fanout import Fanout
from server.events.keys import Keys, RunField, run_index_member
from server.events.log import (
    BusyPolicy,
    ControlListener,
    Listener,
    RunPageCursor,
    RunRecord,
    RunState,
    Subscription,
    ThreadPageCursor,
    ThreadRecord,
    ThreadRunStart,
)
from server.events.redis_records import (
    flatten,
    pairs,
    run_fields,
    run_from_hash,
    store_errors,
    walk_index,
)
from server.events.redis_threads import RedisThreads

# What list_runs reads of each run: everything but the (large) checkpoint.
_LISTED_FIELDS = [field.value for field in RunField if field is not RunField.CHECKPOINT]
_ENQUEUED = RunState.ENQUEUED.value.encode()


def _kept_active(state: bytes | None) -> bool:
    """Whether a member of the active set with this state stays: runnable, or waiting
    in its thread's queue to become runnable."""
    return state is not None and (state == _ENQUEUED or RunState(state.decode()).runnable)


class RedisEventLog:
    """An EventLog on Redis; create it with `await RedisEventLog.connect(url)`."""

    def __init__(
        self,
        client: Redis,
        fanout: Fanout,
        *,
        keys: Keys,
        terminal_ttl_s: float,
        retain_events: int,
        lease_ttl_s: float,
        thread_idle_ttl_s: float = 0,
    ) -> None:
        """Use connect(); this takes ownership of `client` and `fanout`."""
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self._client = client
        self._fanout = fanout
        self._keys = keys
        self._terminal_ttl_ms = max(1, round(terminal_ttl_s * 1000))
        self._retain_events = retain_events
        self._lease_ttl_ms = max(1, round(lease_ttl_s * 1000))
        # The calls many runs make at once (appends of their writers, the lease
        # renewals of one round, the creates and claims of a burst of new runs)
        # share a pipeline per loop turn.
        self._create = ScriptBatcher(client, client.register_script(scripts.CREATE_RUN))
        self._append = ScriptBatcher(client, client.register_script(scripts.APPEND))
        self._read = client.register_script(scripts.READ)
        self._incr = client.register_script(scripts.INCR_COUNTER)
        self._claim = ScriptBatcher(client, client.register_script(scripts.CLAIM))
        self._renew = ScriptBatcher(client, client.register_script(scripts.RENEW))
        self._release = client.register_script(scripts.RELEASE)
        self._journal = client.register_script(scripts.JOURNAL_TOOL)
        self._cancel = client.register_script(scripts.REQUEST_CANCEL)
        self._decide = client.register_script(scripts.DECIDE)
        self._thread_idle_ttl_ms = round(thread_idle_ttl_s * 1000)
        self._threads = RedisThreads(
            client,
            keys,
            lease_ttl_ms=self._lease_ttl_ms,
            thread_idle_ttl_ms=self._thread_idle_ttl_ms,
        )
        self._closed = False

    # What the task store beside this log shares (server/tasks/redis.py).

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def fanout(self) -> Fanout:
        return self._fanout

    @property
    def keys(self) -> Keys:
        return self._keys

    @property
    def thread_idle_ttl_ms(self) -> int:
        return self._thread_idle_ttl_ms

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        key_prefix: str = "keel",
        terminal_ttl_s: float = 86_400,
        retain_events: int = 0,
        lease_ttl_s: float = 5.0,
        thread_idle_ttl_s: float = 0,
        max_connections: int = 64,
        socket_timeout_s: float = 5.0,
        health_check_interval_s: float = 10.0,
    ) -> RedisEventLog:
        """Connect to the Redis at `url` and check it answers; raises StoreUnavailable.

        `socket_timeout_s` bounds every wait on Redis: a command, a free
        connection of the pool (at most `max_connections`, plus the pub/sub
        connection), the acknowledgement of a SUBSCRIBE.
        `health_check_interval_s` is how long the pub/sub connection may stay
        quiet before it is PINGed (and given up after another as long).
        `lease_ttl_s` is how long a run's owner holds it without renewing.
        `thread_idle_ttl_s` is how long a thread without an active run lives
        (0: until deleted).
        """
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout_s,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        keys = Keys(key_prefix)

        def make_pubsub_connection() -> AbstractConnection:
            kwargs = {**pool.connection_kwargs, "client_name": keys.pubsub_client_name}
            return pool.connection_class(**kwargs)

        fanout = Fanout(
            make_pubsub_connection,
            subscribe_timeout_s=socket_timeout_s,
            health_check_interval_s=health_check_interval_s,
        )
        log = cls(
            Redis.from_pool(pool),
            fanout,
            keys=keys,
            terminal_ttl_s=terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_s=thread_idle_ttl_s,
        )
        try:
            await log.ping()
        except BaseException:
            await log.close()
            raise
        return log

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        run_id = record.run_id
        lease_ttl_ms = self._lease_ttl_ms if record.state.runnable else 0
        with store_errors():
            reply = await self._create(
                keys=[self._keys.run(run_id), self._keys.lease(run_id)],
                args=[lease_ttl_ms, record.epoch, *flatten(run_fields(record))],
            )
            if reply[0] == 1:
                stored, created = record, True
            else:
                flat: list[bytes] = reply[1]
                stored, created = run_from_hash(run_id, pairs(flat)), False
            # Outside the script: the index and the active set are not in the
            # run's hash slot. Also done when the run existed, to heal a crash
            # between the two steps.
            member = run_index_member(stored.create_time_ms, run_id)
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._keys.run_index, {member: 0}, nx=True)
                if stored.state.runnable:
                    pipe.sadd(self._keys.active_runs, run_id)
                await pipe.execute()
        return stored, created

    async def get_run(self, run_id: str) -> RunRecord:
        with store_errors():
            # bytes, not str: the client is built without decode_responses.
            fields = cast(dict[bytes, bytes], await self._client.hgetall(self._keys.run(run_id)))
        if not fields:
            raise RunNotFound(run_id)
        return run_from_hash(run_id, fields)

    async def head(self, run_id: str) -> int:
        with store_errors():
            next_index = await self._client.hget(self._keys.run(run_id), RunField.NEXT_INDEX)
        if next_index is None:
            raise RunNotFound(run_id)
        return int(next_index)

    async def list_runs(
        self,
        *,
        agent_id: str = "",
        states: frozenset[RunState] = frozenset(),
        thread_id: str = "",
        schedule_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: RunPageCursor | None = None,
    ) -> list[RunRecord]:
        """Walk the run index (or the thread's) newest first, a batch of run hashes at a time.

        Filters are applied to the fetched hashes, so a selective filter costs
        a walk over the runs it skips; a thread's runs have their own index.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")

        def accept(run_id: str, _: int, fields: dict[bytes, bytes]) -> RunRecord | None:
            run = run_from_hash(run_id, fields)
            if (
                (not agent_id or run.agent_id == agent_id)
                and (not states or run.state in states)
                and (not schedule_id or run.schedule_id == schedule_id)
                and (tenant is None or run.tenant == tenant)
            ):
                return run
            return None

        return await walk_index(
            self._client,
            self._keys.thread_runs(thread_id) if thread_id else self._keys.run_index,
            limit=limit,
            after=None if after is None else (after.create_time_ms, after.run_id),
            hash_key=self._keys.run,
            fields=_LISTED_FIELDS,
            accept=accept,
        )

    async def append(
        self,
        run_id: str,
        epoch: int,
        events: Sequence[AgentEvent],
        *,
        state: RunState | None = None,
        error: str = "",
        checkpoint: bytes | None = None,
        thread_messages: Sequence[bytes] = (),
        goal_progress: str | None = None,
    ) -> int:
        """One APPEND script; then, for a new state, the active set (outside the run's slot).

        A runnable state adds the run to the active set, on every such
        append, so a retry heals a crash between the two steps. A terminal
        state removes it (it never comes back: safe to do eagerly). A
        suspended run is left for claimable to remove, which re-checks the
        state: an eager removal here could undo the addition of a Resume
        that committed in between. A terminal state of a run on a thread
        writes the thread in the same script (keys.py puts both in one slot);
        the run it promotes is in the active set already (start_thread_run).
        """
        check_consecutive(events)
        members = serialize_events(events)
        terminal = state is not None and state.terminal
        thread_id, on_thread, _ = run_id.partition(":")
        args: list[Any] = [
            epoch,
            "" if state is None else state.value,
            error,
            time.time_ns() // 1_000_000,
            self._terminal_ttl_ms if terminal else 0,
            self._retain_events,
            self._keys.live(run_id),
            encode_batch(members),  # b"" without events: nothing is published
            events[0].index if events else 0,
            0 if checkpoint is None else 1,
            b"" if checkpoint is None else checkpoint,
            len(members),
            self._keys.thread_base(thread_id) if on_thread else "",
            thread_id if on_thread else "",
            run_id,
            self._thread_idle_ttl_ms,
            events[-1].step if events else "",
            events[-1].attempt if events else "",
            self._keys.run_base(run_id),
            "" if goal_progress is None else goal_progress,
            *members,
            *(thread_messages if terminal and on_thread else ()),
        ]
        run_key, events_key, *other_keys = self._keys.run_keys(run_id)
        keys = [run_key, events_key, self._keys.lease(run_id), *other_keys]
        if terminal and on_thread:
            keys.extend(self._keys.thread_keys(thread_id))
        with store_errors():
            reply = await self._append(keys=keys, args=args)
            code = reply[0]
            if code == scripts.OK and state is not None:
                if state.runnable:
                    await self._client.sadd(self._keys.active_runs, run_id)
                elif state.terminal:
                    await self._client.srem(self._keys.active_runs, run_id)
        if code == scripts.OK:
            return int(reply[1])
        if code == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        if code == scripts.STALE_EPOCH:
            raise StaleEpoch(run_id, epoch, int(reply[1]))
        if code == scripts.INDEX_CONFLICT:
            raise IndexConflict(run_id, events[0].index, int(reply[1]))
        raise AssertionError(f"unexpected append reply {reply!r}")

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        with store_errors():
            reply = await self._read(
                keys=[self._keys.run(run_id), self._keys.events(run_id)], args=[offset, limit]
            )
        code = reply[0]
        if code == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        if code == scripts.OFFSET_EXPIRED:
            raise OffsetExpired(run_id, offset, int(reply[1]), int(reply[2]))
        if code == scripts.NOT_RESUMABLE:
            raise RunNotResumable(run_id, offset, int(reply[1]))
        members = reply[1]
        return Batch([AgentEvent.FromString(member) for member in members], encode_batch(members))

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        return await self._fanout.subscribe(self._keys.live(run_id), listener)

    async def claim(self, run_id: str, owner: str, *, force: bool = False) -> RunRecord | None:
        with store_errors():
            reply = await self._claim(
                keys=[self._keys.run(run_id), self._keys.lease(run_id)],
                args=[owner, self._lease_ttl_ms, int(force)],
            )
        if reply[0] != scripts.OK:
            return None  # NOT_FOUND, NOT_RUNNABLE or LEASE_HELD
        return run_from_hash(run_id, pairs(reply[1]))

    async def renew(self, run_id: str, epoch: int) -> bool:
        with store_errors():
            reply = await self._renew(
                keys=[self._keys.run(run_id), self._keys.lease(run_id)],
                args=[epoch, self._lease_ttl_ms],
            )
        return bool(reply[0] == scripts.OK)

    async def release(self, run_id: str, epoch: int) -> None:
        with store_errors():
            await self._release(keys=[self._keys.lease(run_id)], args=[epoch])

    async def decide(
        self,
        run_id: str,
        *,
        expected_epoch: int,
        decisions: bytes,
        owner: str,
        resume: bool,
        request_id: str = "",
        request_record: bytes = b"",
    ) -> RunRecord:
        """The DECIDE script; a resumed run then joins the active set (outside its slot)."""
        keys = [self._keys.run(run_id), self._keys.lease(run_id), self._keys.resumes(run_id)]
        args: list[Any] = [
            expected_epoch,
            decisions,
            1 if resume else 0,
            owner,
            self._lease_ttl_ms,
            request_id,
            request_record,
            time.time_ns() // 1_000_000,
        ]
        with store_errors():
            reply = await self._decide(keys=keys, args=args)
            if reply[0] == scripts.OK and resume:
                await self._client.sadd(self._keys.active_runs, run_id)
        if reply[0] == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        if reply[0] == scripts.CONFLICT:
            raise ConcurrentModification(run_id)
        return run_from_hash(run_id, pairs(reply[1]))

    async def resume_request(self, run_id: str, request_id: str) -> bytes | None:
        with store_errors():
            value = await self._client.hget(self._keys.resumes(run_id), request_id)
        return cast(bytes | None, value)

    async def claimable(self, limit: int, *, agent_ids: frozenset[str] | None = None) -> list[str]:
        """Walk the active set for runnable runs without a lease (of `agent_ids`, if given).

        1. SSCAN the active set a batch at a time (a full pass at most).
        2. Per member, read the run's state and whether its lease exists, in
           one pipeline per batch.
        3. Runnable without a lease: claimable. Runnable with a lease: owned.
           Enqueued: kept (its thread makes it runnable in a script, with
           nothing after it to add it). Suspended, ended or gone: stale.
        4. Remove the stale members, then read their state again and add back
           any that became runnable (or enqueued) meanwhile. Writers add a run after they
           commit a runnable state, so either that addition comes after our
           removal, or our second read sees the state: no runnable run is
           ever left out.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        active = self._keys.active_runs
        found: list[str] = []
        seen: set[bytes] = set()  # SSCAN may return a member more than once
        stale: list[bytes] = []
        cursor = 0
        with store_errors():
            while True:
                cursor, batch = await self._client.sscan(active, cursor, count=max(limit, 100))
                members = [m for m in cast(list[bytes], batch) if m not in seen]
                seen.update(members)
                async with self._client.pipeline(transaction=False) as pipe:
                    for member in members:
                        run_id = member.decode()
                        pipe.hmget(self._keys.run(run_id), [RunField.STATE, RunField.AGENT_ID])
                        pipe.exists(self._keys.lease(run_id))
                    replies: list[Any] = await pipe.execute()
                for member, fields, leased in zip(
                    members, replies[::2], replies[1::2], strict=True
                ):
                    state, agent_id = fields
                    if not _kept_active(state):
                        stale.append(member)
                    elif state == _ENQUEUED or leased or len(found) == limit:
                        continue
                    elif agent_ids is None or agent_id.decode() in agent_ids:
                        found.append(member.decode())
                if len(found) == limit or cursor == 0:
                    break
            if stale:
                await self._drop_stale_active(stale)
        return found

    async def _drop_stale_active(self, members: list[bytes]) -> None:
        """Step 4 of claimable: remove, re-read, add back what became runnable."""
        await self._client.srem(self._keys.active_runs, *members)
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hget(self._keys.run(member.decode()), RunField.STATE.value)
            states: list[bytes | None] = await pipe.execute()
        revived = [
            member for member, state in zip(members, states, strict=True) if _kept_active(state)
        ]
        if revived:
            await self._client.sadd(self._keys.active_runs, *revived)

    async def journal_tool(self, run_id: str, epoch: int, tool_call_id: str, result: bytes) -> None:
        with store_errors():
            reply = await self._journal(
                keys=[self._keys.run(run_id), self._keys.tools(run_id)],
                args=[epoch, tool_call_id, result],
            )
        code = reply[0]
        if code == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        if code == scripts.STALE_EPOCH:
            raise StaleEpoch(run_id, epoch, int(reply[1]))

    async def journaled_tool(self, run_id: str, tool_call_id: str) -> bytes | None:
        with store_errors():
            value = await self._client.hget(self._keys.tools(run_id), tool_call_id)
        return cast(bytes | None, value)

    async def request_cancel(self, run_id: str, reason: str) -> RunRecord:
        """The REQUEST_CANCEL script, with the run added to the active set before and after.

        The script may make a suspended or enqueued run runnable; adding it
        first means a crash right after the script cannot leave it out of the
        active set, and adding it again afterwards undoes a sweep that dropped
        it in between (as not yet runnable). A run that turns out ended or
        unknown is dropped by claimable as usual.
        """
        if not reason:
            raise ValueError("a cancel request needs a reason")
        with store_errors():
            await self._client.sadd(self._keys.active_runs, run_id)
            reply = await self._cancel(
                keys=[self._keys.run(run_id)],
                args=[reason, time.time_ns() // 1_000_000, self._keys.control(run_id)],
            )
            if reply[0] == scripts.OK:
                await self._client.sadd(self._keys.active_runs, run_id)
        if reply[0] == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        return run_from_hash(run_id, pairs(reply[1]))

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> Subscription:
        return await self._fanout.subscribe_control(self._keys.control(run_id), listener)

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int:
        with store_errors():
            reply = await self._incr(
                keys=[
                    self._keys.counters(run_id),
                    self._keys.run(run_id),
                    self._keys.once(run_id),
                ],
                args=[key, once_key],
            )
        if reply[0] == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        return int(reply[1])

    async def get_counter(self, run_id: str, key: str) -> int:
        """0 when never incremented, and for unknown or expired runs."""
        with store_errors():
            value = await self._client.hget(self._keys.counters(run_id), key)
        return 0 if value is None else int(value)

    # Threads: see redis_threads.py.

    async def create_thread(self, record: ThreadRecord) -> tuple[ThreadRecord, bool]:
        return await self._threads.create_thread(record)

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        return await self._threads.get_thread(thread_id)

    async def list_threads(
        self,
        *,
        resource_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: ThreadPageCursor | None = None,
    ) -> list[ThreadRecord]:
        return await self._threads.list_threads(
            resource_id=resource_id, tenant=tenant, limit=limit, after=after
        )

    async def delete_thread(self, thread_id: str) -> None:
        await self._threads.delete_thread(thread_id)

    async def thread_messages(self, thread_id: str, start: int, stop: int) -> list[bytes]:
        return await self._threads.thread_messages(thread_id, start, stop)

    async def start_thread_run(self, record: RunRecord, policy: BusyPolicy) -> ThreadRunStart:
        return await self._threads.start_thread_run(record, policy)

    async def ping(self) -> None:
        with store_errors():
            await self._client.ping()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._fanout.close()
        finally:
            await self._client.aclose()
