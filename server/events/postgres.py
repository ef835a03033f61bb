"""PostgresEventLog: the EventLog on PostgreSQL, shared by every Keel replica.

The store lives in one PostgreSQL schema (named after the key prefix, so
deployments and tests share a database side by side), created and migrated
at start by Alembic (pg_migrate.py: versioned raw-SQL revisions under an
advisory lock; a schema newer than the code refuses to start). Every
statement is in sql.py; the schema, and the PL/pgSQL functions that make the
hot paths one round trip, are in migrations/versions.

Writes. Each write of one run is one statement, so it is atomic and one
round trip on a pooled connection (psycopg 3, AsyncConnectionPool, autocommit;
psycopg prepares a statement after its fifth use); the appends of many runs
made in the same loop turn share a round trip and a commit (pg_batcher.py):
- append is the function append_events: it locks the run's row
  (SELECT ... FOR NO KEY UPDATE), checks the writer's epoch and the expected next
  index (an exact replay of a retained batch is a no-op), inserts the events
  (bytea, one row each, from one array parameter), advances next_index and
  the state, trims (retain_events), hands a thread to its next run when a
  run on it ends, and pg_notify()s the batch, all in one transaction;
- claim, renew, release, decide, request_cancel, journal_tool and the
  counters are single UPDATE/INSERT statements (CTEs where a write needs a
  check), whose row locks serialize racing writers (two claimers: the second
  one's UPDATE re-checks the lease on the row the first committed, and
  finds it held);
- starting a run on a thread and deleting a thread are short transactions
  that lock the thread's row first (append, which also locks a thread when a
  run on it ends, locks it before the run's row too: no deadlock).

Live notifications: LISTEN/NOTIFY, one LISTEN connection per process, one
channel per store (pg_fanout.py). NOTIFY is transactional: it is delivered
after commit, so a listener never hears of an uncommitted event.

Leases and retention use the database's clock (clock_timestamp()), never the
instance's. A lease is the run row's lease_until; the epoch column is the
fencing token. An ended run gets expires_at; reads treat a run past it as
gone at once, and a periodic sweep (every `sweep_interval_s`, on every
instance) deletes expired runs and threads in batches of `sweep_batch`,
skipping rows other transactions hold (FOR UPDATE SKIP LOCKED), so it never
blocks an append. A creation that meets an expired row not yet swept deletes
it first.

Connection errors (and a pool with no free connection within `timeout_s`)
surface as StoreUnavailable (postgres_records.store_errors): the API answers
UNAVAILABLE with RetryInfo, as on Redis. As on Redis, nothing is retried
here; append and create_run are safe for the caller to retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import psycopg
from keel.v1.agent_service_pb2 import AgentEvent
from psycopg_pool import AsyncConnectionPool

from server import background
from server.errors import (
    ConcurrentModification,
    IndexConflict,
    OffsetExpired,
    RunNotFound,
    RunNotResumable,
    StaleEpoch,
    ThreadBusy,
    ThreadNotFound,
)
from server.events import sql
from server.events.codec import Batch, check_consecutive, encode_batch, serialize_events
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
from server.events.pg_batcher import AppendBatcher
from server.events.pg_fanout import PgFanout, events_payload
from server.events.pg_migrate import migrate
from server.events.postgres_records import (
    run_from_row,
    run_params,
    store_errors,
    thread_from_row,
)

logger = logging.getLogger(__name__)

# Append's statuses (append_events in migrations/versions/0001).
_APPENDED, _NO_RUN, _STALE, _CONFLICT, _REPLAY = 0, 1, 2, 3, 4
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1


def schema_of(key_prefix: str) -> str:
    """The PostgreSQL schema of a store with this key prefix: lower case letters, digits
    and underscores (so it is also a plain LISTEN channel name), at most 63 of them."""
    name = re.sub(r"[^a-z0-9_]", "_", key_prefix.lower()) or "keel"
    if not (name[0].isalpha() or name[0] == "_"):
        name = "k" + name
    return name[:_MAX_IDENTIFIER]


class PostgresEventLog:
    """An EventLog on PostgreSQL; create it with `await PostgresEventLog.connect(url)`."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        schema: str,
        terminal_ttl_s: float,
        retain_events: int,
        lease_ttl_s: float,
        thread_idle_ttl_s: float = 0,
    ) -> None:
        """Use connect(); this takes ownership of `pool`."""
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self._pool = pool
        self._schema = schema
        self._terminal_ttl_ms = max(1, round(terminal_ttl_s * 1000))
        self._retain_events = retain_events
        self._lease_ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._thread_idle_ttl_ms = round(thread_idle_ttl_s * 1000)
        self._appends = AppendBatcher(pool)
        self._fanout: PgFanout | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # What the stores beside this log share (tasks, schedules, push configs).

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool; its connections' search_path is the store's schema."""
        return self._pool

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this store's runs (pg_fanout.py)."""
        return self._schema

    @property
    def fanout(self) -> PgFanout:
        assert self._fanout is not None, "use PostgresEventLog.connect()"
        return self._fanout

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
        min_connections: int = 2,
        max_connections: int = 32,
        timeout_s: float = 5.0,
        health_check_interval_s: float = 10.0,
        sweep_interval_s: float = 5.0,
        sweep_batch: int = 500,
    ) -> PostgresEventLog:
        """Migrate the schema, open the pool and the LISTEN connection, and start the sweep.

        Raises StoreUnavailable if the database cannot be reached, SchemaTooNew
        (from pg_migrate.py) if a newer Keel migrated it. `timeout_s` bounds the wait
        for a free pooled connection (of at most `max_connections`, plus the
        LISTEN connection) and for connecting. `health_check_interval_s` is how long
        the LISTEN connection may stay quiet before it is checked with a query.
        """
        schema = schema_of(key_prefix)
        await migrate(url, schema)
        connect_kwargs: dict[str, Any] = {
            "options": f"-c search_path={schema}",
            "application_name": f"keel-{schema}"[:_MAX_IDENTIFIER],
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            # Bounds how long sent data may stay unacknowledged (a broken network).
            "tcp_user_timeout": max(1000, round(timeout_s * 1000)),
        }
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=min_connections,
            max_size=max(min_connections, max_connections),
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(timeout_s)),
                **connect_kwargs,
            },
            timeout=timeout_s,
            open=False,
            name=f"keel-{schema}",
        )
        log = cls(
            pool,
            schema=schema,
            terminal_ttl_s=terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_s=thread_idle_ttl_s,
        )
        try:
            with store_errors():
                await pool.open(wait=True, timeout=timeout_s)
            listen_kwargs = dict(connect_kwargs)
            listen_kwargs["application_name"] = f"keel-listen-{schema}"[:_MAX_IDENTIFIER]
            log._fanout = PgFanout(
                url,
                schema,
                log._fetch_events,
                log._notify,
                connect_kwargs=listen_kwargs,
                connect_timeout_s=timeout_s,
                health_check_interval_s=health_check_interval_s,
            )
            await log._fanout.start()
            log._sweeper = asyncio.create_task(
                log._sweep_forever(sweep_interval_s, sweep_batch), name=f"pg-sweep-{schema}"
            )
        except BaseException:
            await log.close()
            raise
        return log

    # Runs.

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        params = run_params(record)
        params["leased"] = record.state.runnable
        params["lease_ttl_ms"] = self._lease_ttl_ms
        with store_errors():
            async with self._pool.connection() as conn:
                for _attempt in range(3):
                    cursor = await conn.execute(sql.CREATE_RUN, params)
                    if cursor.rowcount == 1:
                        return record, True
                    cursor = await conn.execute(sql.GET_RUN, (record.run_id,))
                    row = await cursor.fetchone()
                    if row is not None:
                        return run_from_row(row), False
                    # Its retention time passed but the sweep has not deleted it yet.
                    await conn.execute(sql.PURGE_EXPIRED_RUN, (record.run_id,))
        raise ConcurrentModification(record.run_id)

    async def get_run(self, run_id: str) -> RunRecord:
        row = await self._one(sql.GET_RUN, (run_id,))
        if row is None:
            raise RunNotFound(run_id)
        return run_from_row(row)

    async def head(self, run_id: str) -> int:
        row = await self._one(sql.HEAD, (run_id,))
        if row is None:
            raise RunNotFound(run_id)
        return int(row[0])

    async def history(self, run_id: str) -> tuple[int, str]:
        # A PostgreSQL log never goes back (its commits are durable): no lineage.
        return await self.head(run_id), ""

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
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        query = sql.list_runs(
            agent_id=bool(agent_id),
            states=bool(states),
            thread_id=bool(thread_id),
            schedule_id=bool(schedule_id),
            tenant=tenant is not None,
            after=after is not None,
        )
        params: dict[str, Any] = {
            "agent_id": agent_id,
            "states": [state.value for state in states],
            "thread_id": thread_id,
            "schedule_id": schedule_id,
            "tenant": tenant,
            "after_time": None if after is None else after.create_time_ms,
            "after_id": None if after is None else after.run_id,
            "limit": limit,
        }
        return [run_from_row(row) for row in await self._all(query, params)]

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
        batch = list(events)
        check_consecutive(batch)
        members = serialize_events(batch)
        first = batch[0].index if batch else 0
        payload: str | None = None
        encoded = b""
        if batch:
            encoded = encode_batch(members)
            payload = events_payload(run_id, first, len(batch), encoded)
        params = (
            run_id,
            epoch,
            first,
            members,
            None if state is None else state.value,
            error,
            checkpoint,
            goal_progress,
            list(thread_messages),
            self._retain_events,
            self._terminal_ttl_ms,
            self._thread_idle_ttl_ms,
            batch[-1].step if batch else 0,
            batch[-1].attempt if batch else 0,
            self.channel,
            payload,
        )
        if state is not None and state.terminal:
            # May lock a thread's row: never in a shared transaction (pg_batcher.py).
            row = await self._one(sql.APPEND, params)
        else:
            row = await self._appends(params)
        assert row is not None
        status, next_index, current_epoch = row
        if status == _NO_RUN:
            raise RunNotFound(run_id)
        if status == _STALE:
            raise StaleEpoch(run_id, epoch, current_epoch)
        if status == _CONFLICT:
            raise IndexConflict(run_id, first, next_index)
        return int(next_index)

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        row = await self._one(sql.READ, {"run_id": run_id, "offset": offset, "limit": limit})
        if row is None:
            raise RunNotFound(run_id)
        next_index, earliest_index, live_only, bodies = row
        if live_only and offset < next_index:
            raise RunNotResumable(run_id, offset, next_index)
        if offset < earliest_index:
            raise OffsetExpired(run_id, offset, earliest_index, next_index)
        members = [bytes(body) for body in bodies]
        return Batch([AgentEvent.FromString(member) for member in members], encode_batch(members))

    async def _fetch_events(self, run_id: str, first: int, count: int) -> list[AgentEvent]:
        """For the fanout's doorbells: committed events [first, first + count)."""
        return await self.read(run_id, first, count)

    async def _notify(self, payload: str) -> None:
        """For the fanout: NOTIFY `payload` on the store's channel."""
        await self._one(sql.NOTIFY, (self.channel, payload))

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        # No RunNotFound here: an observer may subscribe before it reads the run.
        return await self.fanout.subscribe(run_id, listener)

    # Ownership.

    async def claim(self, run_id: str, owner: str, *, force: bool = False) -> RunRecord | None:
        row = await self._one(
            sql.CLAIM,
            {"run_id": run_id, "owner": owner, "force": force, "lease_ttl_ms": self._lease_ttl_ms},
        )
        return None if row is None else run_from_row(row)

    async def renew(self, run_id: str, epoch: int) -> bool:
        params = {"run_id": run_id, "epoch": epoch, "lease_ttl_ms": self._lease_ttl_ms}
        return await self._rowcount(sql.RENEW, params) == 1

    async def release(self, run_id: str, epoch: int) -> None:
        await self._rowcount(sql.RELEASE, (run_id, epoch))

    async def claimable(self, limit: int, *, agent_ids: frozenset[str] | None = None) -> list[str]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        query = sql.claimable(agent_ids=agent_ids is not None)
        params = {"agent_ids": sorted(agent_ids or ()), "limit": limit}
        return [row[0] for row in await self._all(query, params)]

    # The tool journal.

    async def journal_tool(self, run_id: str, epoch: int, tool_call_id: str, result: bytes) -> None:
        row = await self._one(
            sql.JOURNAL_TOOL,
            {"run_id": run_id, "epoch": epoch, "tool_call_id": tool_call_id, "result": result},
        )
        if row is None:
            raise RunNotFound(run_id)
        if row[0] != epoch:
            raise StaleEpoch(run_id, epoch, row[0])

    async def journaled_tool(self, run_id: str, tool_call_id: str) -> bytes | None:
        row = await self._one(sql.JOURNALED_TOOL, (run_id, tool_call_id))
        return None if row is None else bytes(row[0])

    # Human in the loop.

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
        row = await self._one(
            sql.DECIDE,
            {
                "run_id": run_id,
                "expected_epoch": expected_epoch,
                "decisions": decisions,
                "owner": owner,
                "resume": resume,
                "request_id": request_id,
                "request_record": request_record,
                "lease_ttl_ms": self._lease_ttl_ms,
            },
        )
        if row is not None:
            return run_from_row(row)
        if await self._one(sql.EXISTS, (run_id,)) is None:
            raise RunNotFound(run_id)
        raise ConcurrentModification(run_id)

    async def resume_request(self, run_id: str, request_id: str) -> bytes | None:
        row = await self._one(sql.RESUME_REQUEST, (run_id, request_id))
        return None if row is None else bytes(row[0])

    # Cancellation.

    async def request_cancel(self, run_id: str, reason: str) -> RunRecord:
        if not reason:
            raise ValueError("a cancel request needs a reason")
        with store_errors():
            async with self._pool.connection() as conn:
                record = await self._cancel(conn, run_id, reason)
                if record is not None:
                    return record
                cursor = await conn.execute(sql.GET_RUN, (run_id,))
                row = await cursor.fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return run_from_row(row)  # ended: nothing to cancel

    async def _cancel(
        self,
        conn: psycopg.AsyncConnection[Any],
        run_id: str,
        reason: str,
        *,
        interrupted_by: str = "",
        rollback: bool = False,
    ) -> RunRecord | None:
        """The cancel request on a run not ended (None: ended or gone); notifies at commit."""
        cursor = await conn.execute(
            sql.REQUEST_CANCEL,
            {
                "run_id": run_id,
                "reason": reason,
                "interrupted_by": interrupted_by,
                "rollback": rollback,
                "channel": self.channel,
            },
        )
        row = await cursor.fetchone()
        return None if row is None else run_from_row(row)

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> Subscription:
        return await self.fanout.subscribe_control(run_id, listener)

    # Threads.

    async def create_thread(self, record: ThreadRecord) -> tuple[ThreadRecord, bool]:
        params = {
            "thread_id": record.thread_id,
            "resource_id": record.resource_id,
            "metadata": json.dumps(record.metadata),
            "request_id": record.request_id,
            "create_time_ms": record.create_time_ms,
            "update_time_ms": record.update_time_ms,
            "owner": record.owner,
            "idle_ttl_ms": self._thread_idle_ttl_ms,
        }
        with store_errors():
            async with self._pool.connection() as conn:
                for _attempt in range(3):
                    cursor = await conn.execute(sql.CREATE_THREAD, params)
                    if cursor.rowcount == 1:
                        return record, True
                    cursor = await conn.execute(sql.GET_THREAD, (record.thread_id,))
                    row = await cursor.fetchone()
                    if row is not None:
                        return thread_from_row(row, row[-1]), False
                    await conn.execute(sql.PURGE_EXPIRED_THREAD, (record.thread_id,))
        raise ThreadBusy(record.thread_id, "")

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        row = await self._one(sql.GET_THREAD, (thread_id,))
        if row is None:
            raise ThreadNotFound(thread_id)
        return thread_from_row(row, row[-1])

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
        query = sql.list_threads(
            resource_id=bool(resource_id), tenant=tenant is not None, after=after is not None
        )
        params: dict[str, Any] = {
            "resource_id": resource_id,
            "tenant": tenant,
            "after_time": None if after is None else after.create_time_ms,
            "after_id": None if after is None else after.thread_id,
            "limit": limit,
        }
        return [thread_from_row(row, row[-1]) for row in await self._all(query, params)]

    async def delete_thread(self, thread_id: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(sql.LOCK_THREAD, (thread_id,))
                row = await cursor.fetchone()
                if row is None:
                    raise ThreadNotFound(thread_id)
                thread = thread_from_row(row, row[-1])
                waiting = thread.active_run_id or next(iter(thread.queued_run_ids), "")
                if waiting:
                    raise ThreadBusy(thread_id, waiting)
                await conn.execute(sql.DELETE_THREAD, (thread_id,))
                await conn.execute(sql.PURGE_THREAD, (thread_id,))

    async def thread_messages(self, thread_id: str, start: int, stop: int) -> list[bytes]:
        if start < 0 or stop < start:
            raise ValueError(f"bad range [{start}, {stop})")
        row = await self._one(sql.THREAD_MESSAGES, (start, stop, thread_id))
        if row is None:
            raise ThreadNotFound(thread_id)
        return [bytes(body) for body in row[0]]

    async def start_thread_run(self, record: RunRecord, policy: BusyPolicy) -> ThreadRunStart:
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(sql.LOCK_THREAD, (record.thread_id,))
                thread_row = await cursor.fetchone()
                if thread_row is None:
                    raise ThreadNotFound(record.thread_id)
                cursor = await conn.execute(sql.GET_RUN, (record.run_id,))
                existing = await cursor.fetchone()
                if existing is not None:
                    return ThreadRunStart(run_from_row(existing), created=False)
                await conn.execute(sql.PURGE_EXPIRED_RUN, (record.run_id,))
                active_run_id: str = thread_row[7]
                active: RunRecord | None = None
                if active_run_id:
                    cursor = await conn.execute(sql.GET_RUN_FOR_UPDATE, (active_run_id,))
                    active_row = await cursor.fetchone()
                    active = None if active_row is None else run_from_row(active_row)
                if active is None:
                    await self._insert_run(conn, record)
                    await conn.execute(sql.ACTIVATE_THREAD, (record.run_id, record.thread_id))
                    return ThreadRunStart(record, created=True)
                if policy is BusyPolicy.REJECT:
                    raise ThreadBusy(record.thread_id, active_run_id)
                enqueued = dataclasses.replace(record, state=RunState.ENQUEUED, owner="")
                await self._insert_run(conn, enqueued)
                await conn.execute(
                    sql.ENQUEUE, {"thread_id": record.thread_id, "run_id": record.run_id}
                )
                started = ThreadRunStart(enqueued, created=True)
                if policy in (BusyPolicy.INTERRUPT, BusyPolicy.ROLLBACK):
                    rollback = policy is BusyPolicy.ROLLBACK
                    verb = "rolled back" if rollback else "interrupted"
                    cancelled = await self._cancel(
                        conn,
                        active.run_id,
                        f"{verb} by run {record.run_id}",
                        interrupted_by=record.run_id,
                        rollback=rollback,
                    )
                    if cancelled is not None:
                        started = dataclasses.replace(started, interrupted_run_id=active.run_id)
                return started

    async def _insert_run(self, conn: psycopg.AsyncConnection[Any], record: RunRecord) -> None:
        params = run_params(record)
        params["leased"] = record.state.runnable
        params["lease_ttl_ms"] = self._lease_ttl_ms
        await conn.execute(sql.CREATE_RUN, params)

    async def add_to_thread(self, thread_id: str, entry: bytes) -> None:
        """Add an entry from outside any run (a late task result) to a thread: to its
        history if it is idle, else after the active run's own messages, when that run
        ends. A thread that is gone takes nothing."""
        await self._rowcount(sql.ADD_TO_THREAD, (thread_id, entry, self._thread_idle_ttl_ms))

    async def has_run(self, run_id: str) -> bool:
        """Whether the run exists (its retention time has not passed)."""
        return await self._one(sql.EXISTS, (run_id,)) is not None

    # Counters.

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int:
        params = {"run_id": run_id, "key": key, "once_key": once_key}
        row = await self._one(sql.INCR_COUNTER, params)
        assert row is not None
        exists, incremented, before = row
        if not exists:
            raise RunNotFound(run_id)
        if incremented is not None:
            return int(incremented)
        return int(before or 0)

    async def get_counter(self, run_id: str, key: str) -> int:
        row = await self._one(sql.GET_COUNTER, (run_id, key))
        return 0 if row is None else int(row[0])

    # Retention.

    async def expire(self, batch: int = 500) -> int:
        """Delete up to `batch` runs and threads whose retention time passed; how many."""
        row = await self._one(sql.EXPIRE, (batch,))
        return 0 if row is None else int(row[0])

    async def _sweep_forever(self, interval_s: float, batch: int) -> None:
        while not self._closed:
            await asyncio.sleep(interval_s)
            try:
                # A full batch: more to delete; go on, in short transactions.
                deleted = batch
                while deleted >= batch:
                    deleted = await self.expire(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("PostgreSQL retention sweep failed", exc_info=True)

    # Connections.

    async def ping(self) -> None:
        await self._one(sql.PING, ())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            await background.stop(self._sweeper, within_s=5.0)
        if self._fanout is not None:
            await self._fanout.close()
        await self._appends.close()
        await self._pool.close()

    async def _one(self, query: str, params: Any) -> tuple[Any, ...] | None:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                row: tuple[Any, ...] | None = await cursor.fetchone()
                return row

    async def _all(self, query: str, params: Any) -> list[tuple[Any, ...]]:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                rows: list[tuple[Any, ...]] = await cursor.fetchall()
                return rows

    async def _rowcount(self, query: str, params: Any) -> int:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                count: int = cursor.rowcount
                return count
