"""RedisEventLog: the EventLog on Redis, shared by every Keel replica.

Each write is one Lua script on one run's keys (scripts.py), so it is atomic
and one round trip; the key layout is in keys.py. Live notifications travel
over one pub/sub connection per process (fanout.py): each append publishes
a serialized EventBatch of its events. An append that only changes the
state publishes nothing, since listeners learn about runs from events.
Cancel requests travel over the same connection, on each run's control
channel.

Ownership: a run's lease is a key holding the owner's epoch that expires
by itself (PX = lease_ttl_s). Two keys outside the runs' slots (keys.py)
tell claimable where to look, so a sweep costs nothing per healthy run:

- The lease deadline set: per run, when its lease lapses (Redis's clock),
  or an earlier time at which the run must be looked at. A script that sets
  a lease (create, claim, renew, resume) returns the lease's exact deadline
  and the caller records it after the script; a write that may leave a run
  runnable without a lease (release, an append that moves the state, a
  cancel request, a thread's promotion or interruption) records "now". Only
  the members whose time came are read, and each is checked against the
  truth, the run's state and lease: runnable without a lease is claimable;
  leased, it moves to its lease's deadline (a compare-and-set, so a writer
  that moved it meanwhile wins); not runnable, it leaves the set.
  A deadline recorded too early costs one wasted check; one recorded too
  late would delay a takeover, and cannot be: each writer records the
  deadline of the lease it set (a later lease only makes it early), or
  "now", and a sweep moves a member only to a deadline read from the lease
  and only if nobody moved it since. The one race that delays: a renewal
  in flight while its owner drops the lease (release, suspension), the
  renewal's deadline landing last. The renewal may as well have set the
  lease again after the release (that race is older than the set); either
  way the run waits for that lease's deadline, as after a crash.
- The active set: every run that may need an owner, as before the deadline
  set existed. A deadline write lost in a crash leaves a deadline too early
  (harmless) or none, and a run with none is still in the active set
  (added when it was created, or, for a write that makes a run runnable
  later, before its script). At a server's first sweep and then every
  FULL_PASS_INTERVAL_S claimable walks it, a few pages per sweep, and
  checks only the members missing from the deadline set (runs older than
  the set, deadline writes lost in a crash): O(active runs) every 30 s,
  not every sweep. It also drops the stale members.

Redis connection and timeout errors surface as StoreUnavailable. Commands
are not retried on connection errors (a retried increment could count
twice); append and create_run are safe for the caller to retry, because an
exact replay of a committed batch (still retained whole) is a no-op and creation is
idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from keel.v1.agent_service_pb2 import AgentEvent

from server.errors import (
    ConcurrentModification,
    IndexConflict,
    OffsetExpired,
    RunNotFound,
    RunNotResumable,
    StaleEpoch,
)
from server.events import scripts
from server.events.batcher import ScoreBatcher, ScriptBatcher
from server.events.codec import Batch, check_consecutive, encode_batch, serialize_events
from server.events.incarnation import AppendBatcher, Incarnations
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
from server.events.redis_client import AnyFanout, RedisClient, open_client, register
from server.events.redis_records import (
    flatten,
    pairs,
    prune_index,
    run_fields,
    run_from_hash,
    store_errors,
    walk_index,
)
from server.events.redis_threads import RedisThreads

# What list_runs reads of each run: everything but the (large) checkpoint.
_LISTED_FIELDS = [field.value for field in RunField if field is not RunField.CHECKPOINT]
_ENQUEUED = RunState.ENQUEUED.value.encode()

# How often claimable walks the whole active set for members missing from the
# lease deadline set (the safety net); each sweep walks at most _PASS_PAGES
# SSCAN pages of it, going on from there at the next one.
FULL_PASS_INTERVAL_S = 30.0
_PASS_PAGE = 500
_PASS_PAGES = 4
_DUE_PAGE = 200  # members of the deadline set read at once
# How often claimable prunes the run, thread and task indexes of members whose run (or
# thread, or task) expired: from the oldest while pages hold stale members (at most
# _PRUNE_PAGES), and one page of a rolling pass over the rest.
PRUNE_INTERVAL_S = 30.0
_PRUNE_PAGE = 200
_PRUNE_PAGES = 10
_NO_LEASE = -2  # PTTL of a missing key


def _kept_active(state: bytes | None) -> bool:
    """Whether a member of the active set with this state stays: runnable, or waiting
    in its thread's queue to become runnable."""
    return state is not None and (state == _ENQUEUED or RunState(state.decode()).runnable)


def _runnable(state: bytes | None) -> bool:
    return state is not None and state != _ENQUEUED and RunState(state.decode()).runnable


def _serves(agent_id: bytes | None, agent_ids: frozenset[str] | None) -> bool:
    """Whether a run of `agent_id` is for a sweeper of `agent_ids` (None: of every agent)."""
    return agent_ids is None or (agent_id is not None and agent_id.decode() in agent_ids)


class RedisEventLog:
    """An EventLog on Redis; create it with `await RedisEventLog.connect(url)`."""

    def __init__(
        self,
        client: RedisClient,
        fanout: AnyFanout,
        *,
        keys: Keys,
        terminal_ttl_s: float,
        retain_events: int,
        lease_ttl_s: float,
        thread_idle_ttl_s: float = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
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
        self._create = ScriptBatcher(client, register(client, scripts.CREATE_RUN))
        self._append = AppendBatcher(
            client,
            Incarnations(client),
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )
        self._read = register(client, scripts.READ)
        self._incr = register(client, scripts.INCR_COUNTER)
        self._claim = ScriptBatcher(client, register(client, scripts.CLAIM))
        self._renew = ScriptBatcher(client, register(client, scripts.RENEW))
        self._release = register(client, scripts.RELEASE)
        self._journal = register(client, scripts.JOURNAL_TOOL)
        self._cancel = register(client, scripts.REQUEST_CANCEL)
        self._decide = register(client, scripts.DECIDE)
        self._thread_idle_ttl_ms = round(thread_idle_ttl_s * 1000)
        self._threads = RedisThreads(
            client,
            keys,
            lease_ttl_ms=self._lease_ttl_ms,
            thread_idle_ttl_ms=self._thread_idle_ttl_ms,
        )
        # The lease deadline set (see the module docstring).
        self._due = register(client, scripts.DUE)
        self._reschedule = register(client, scripts.RESCHEDULE)
        # The lease keeper renews all of a process's leases at once: their
        # deadlines travel together.
        self._deadlines = ScoreBatcher(client, keys.lease_deadlines)
        self._next_pass = 0.0  # time.monotonic() of the next full pass of the active set
        self._next_prune = 0.0  # time.monotonic() of the next pruning of the indexes
        self._prune_cursors: dict[str, bytes | None] = {}  # index -> its rolling pass's place
        self._pass_cursor = 0  # its SSCAN cursor, while a pass goes on (0: from the start)
        self._closed = False

    # What the task store beside this log shares (server/tasks/redis.py).

    @property
    def client(self) -> RedisClient:
        return self._client

    @property
    def fanout(self) -> AnyFanout:
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
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
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
        `wait_replicas`: every append waits until that many replicas acknowledged it
        (Redis WAIT, at most `wait_timeout_ms`), or fails with StoreUnavailable; one Redis
        only, not a cluster.
        """
        client, fanout = open_client(
            url,
            max_connections=max_connections,
            socket_timeout_s=socket_timeout_s,
            health_check_interval_s=health_check_interval_s,
            pubsub_client_name=Keys(key_prefix).pubsub_client_name,
        )
        log = cls(
            client,
            fanout,
            keys=Keys(key_prefix),
            terminal_ttl_s=terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_s=thread_idle_ttl_s,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
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
            # Outside the script: the index, the active set and the lease
            # deadlines are not in the run's hash slot. Also done when the run
            # existed, to heal a crash between the two steps (its deadline
            # unknown here: look at it now, unless one is recorded).
            member = run_index_member(stored.create_time_ms, run_id)
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._keys.run_index, {member: 0}, nx=True)
                if stored.state.runnable:
                    pipe.sadd(self._keys.active_runs, run_id)
                    deadline = {run_id: int(reply[1]) if created else int(reply[2])}
                    pipe.zadd(self._keys.lease_deadlines, deadline, nx=not created)
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

    async def history(self, run_id: str) -> tuple[int, str]:
        with store_errors():
            # bytes, not str: the client is built without decode_responses.
            next_index, lineage = cast(
                list[bytes | None],
                await self._client.hmget(
                    self._keys.run(run_id), [RunField.NEXT_INDEX, RunField.LINEAGE]
                ),
            )
        if next_index is None:
            raise RunNotFound(run_id)
        return int(next_index), (lineage or b"").decode()

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
        """One APPEND script; then, for a new state, the active set and the lease
        deadlines (outside the run's slot).

        A runnable state adds the run to the active set, on every such
        append, so a retry heals a crash between the two steps; without a
        lease (a Resume of a suspended run) it is due at once. A terminal
        state removes it from both (it never comes back: safe to do eagerly).
        A suspended run is left for claimable to remove, which re-checks the
        state: an eager removal here could undo the addition of a Resume
        that committed in between; it is made due now, so the next sweep
        does. A terminal state of a run on a thread
        writes the thread in the same script (keys.py puts both in one slot);
        the run it promotes is in the active set already (start_thread_run),
        and is due at once: nobody owns it yet.
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
                await self._after_new_state(run_id, state, reply)
        if code == scripts.OK:
            return int(reply[1])
        if code == scripts.NOT_FOUND:
            raise RunNotFound(run_id)
        if code == scripts.STALE_EPOCH:
            raise StaleEpoch(run_id, epoch, int(reply[1]))
        if code == scripts.INDEX_CONFLICT:
            raise IndexConflict(run_id, events[0].index, int(reply[1]))
        raise AssertionError(f"unexpected append reply {reply!r}")

    async def _after_new_state(self, run_id: str, state: RunState, reply: list[Any]) -> None:
        """The active set and the lease deadlines after an APPEND that moved the state."""
        promoted, now, leased = reply[2], int(reply[3]), int(reply[4])
        active, deadlines = self._keys.active_runs, self._keys.lease_deadlines
        async with self._client.pipeline(transaction=False) as pipe:
            if state.runnable:
                pipe.sadd(active, run_id)
                if not leased:
                    pipe.zadd(deadlines, {run_id: now})
            elif state.terminal:
                pipe.srem(active, run_id)
                pipe.zrem(deadlines, run_id)
            else:
                pipe.zadd(deadlines, {run_id: now})
            if promoted:
                pipe.zadd(deadlines, {promoted: now})
            await pipe.execute()

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
            if reply[0] == scripts.OK:
                await self._client.zadd(self._keys.lease_deadlines, {run_id: int(reply[2])})
        if reply[0] != scripts.OK:
            return None  # NOT_FOUND, NOT_RUNNABLE or LEASE_HELD
        return run_from_hash(run_id, pairs(reply[1]))

    async def renew(self, run_id: str, epoch: int) -> bool:
        with store_errors():
            reply = await self._renew(
                keys=[self._keys.run(run_id), self._keys.lease(run_id)],
                args=[epoch, self._lease_ttl_ms],
            )
            if reply[0] == scripts.OK:
                await self._deadlines.record(run_id, int(reply[1]))
        return bool(reply[0] == scripts.OK)

    async def release(self, run_id: str, epoch: int) -> None:
        with store_errors():
            reply = await self._release(keys=[self._keys.lease(run_id)], args=[epoch])
            if reply[1] == 1:  # dropped: claimable at once
                await self._client.zadd(self._keys.lease_deadlines, {run_id: int(reply[2])})

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
        """The DECIDE script; a resumed run then joins the active set, with its new
        lease's deadline (outside its slot)."""
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
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.sadd(self._keys.active_runs, run_id)
                    pipe.zadd(self._keys.lease_deadlines, {run_id: int(reply[2])})
                    await pipe.execute()
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
        """The due members of the lease deadline set, then, when one is due, a stretch
        of the full pass of the active set: runnable runs without a lease (of
        `agent_ids`, if given).

        1. Read the members of the deadline set whose time came (DUE, in
           deadline order, a page at a time) and, per member, the run's state,
           agent and lease (PTTL), in one pipeline per page.
        2. Runnable without a lease: claimable (it stays due until claimed).
           Leased: it moves to its lease's deadline (RESCHEDULE: only if its
           deadline is still the one read, so a writer that moved it
           meanwhile wins). Enqueued: it leaves the deadline set (its thread
           makes it due when it becomes runnable). Suspended, ended or gone:
           stale, it leaves both sets.
        3. At the first call and then every FULL_PASS_INTERVAL_S: walk the
           active set (SSCAN, at most _PASS_PAGES pages per call, going on
           from there at the next call) and check only its members without a
           deadline (ZMSCORE): runs older than the deadline set, or whose
           deadline a crash lost. Each gets one (its lease's, or now), the
           claimable ones are found, the stale ones leave.
        4. Remove the stale members, then read their state again and add back
           any that became runnable (or enqueued) meanwhile. Writers record a
           run after they commit a runnable state, so either that addition
           comes after our removal, or our second read sees the state: no
           runnable run is ever left out.
        5. At the first call and then every PRUNE_INTERVAL_S: the run, thread
           and task indexes lose the members of expired runs, threads and tasks (a
           list call removes those it walks past, but nothing else would, and
           the indexes would grow by a member per run ever made).

        A sweep's cost is the due members' (lapsed, released or just changed
        runs), not the healthy runs', plus the full pass every 30 s.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        found: dict[str, None] = {}  # ordered, without repeats
        with store_errors():
            now = await self._walk_due(limit, agent_ids, found)
            if len(found) < limit and time.monotonic() >= self._next_pass:
                await self._walk_active(now, limit, agent_ids, found)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                await self._prune(self._keys.run_index, self._keys.run)
                await self._prune(self._keys.thread_index, self._keys.thread)
                await self._prune(self._keys.task_index, self._keys.task)  # tasks/redis.py
        return list(found)

    async def _prune(self, index: str, hash_key: Callable[[str], str]) -> int:
        """Step 5 of claimable: members of an index whose run (or thread) expired leave it.
        Expiry follows creation roughly, so they gather at the old end: prune from there
        while pages hold some; then one page of a rolling pass finds the stragglers. How
        many left."""
        removed = 0
        after: bytes | None = None
        for _ in range(_PRUNE_PAGES):
            after, stale = await prune_index(
                self._client, index, after=after, batch_size=_PRUNE_PAGE, hash_key=hash_key
            )
            removed += stale
            if after is None or stale == 0:
                break
        if after is None:
            return removed  # the old end reached the newest member: nothing else to look at
        # The rolling pass starts anew after the stretch just read.
        self._prune_cursors[index], stale = await prune_index(
            self._client,
            index,
            after=self._prune_cursors.get(index) or after,
            batch_size=_PRUNE_PAGE,
            hash_key=hash_key,
        )
        return removed + stale

    async def _look(self, members: list[bytes]) -> list[tuple[bytes | None, bytes | None, int]]:
        """Per run id: the run's state and agent id (None: gone) and its lease's PTTL
        (ms left, or _NO_LEASE), in one pipeline."""
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                run_id = member.decode()
                pipe.hmget(self._keys.run(run_id), [RunField.STATE, RunField.AGENT_ID])
                pipe.pttl(self._keys.lease(run_id))
            replies: list[Any] = await pipe.execute()
        return [
            (fields[0], fields[1], int(pttl))
            for fields, pttl in zip(replies[::2], replies[1::2], strict=True)
        ]

    def _lapses(self, now: int, pttl: int) -> int:
        """When a lease with `pttl` ms left at `now` or later lapses, at the earliest."""
        return now + (pttl if pttl >= 0 else self._lease_ttl_ms)  # -1: no PX (never set so)

    async def _walk_due(
        self, limit: int, agent_ids: frozenset[str] | None, found: dict[str, None]
    ) -> int:
        """Steps 1, 2 and 4 of claimable; returns Redis's now."""
        deadlines = self._keys.lease_deadlines
        now = -1  # read by the first page, kept by the next ones
        offset = 0
        moves: list[Any] = []  # member, deadline read, new deadline, ...
        undue: list[bytes] = []  # members leaving the deadline set
        stale: list[bytes] = []  # ... and the active set
        while True:
            reply = await self._due(
                keys=[deadlines], args=[offset, _DUE_PAGE, now if now >= 0 else ""]
            )
            now = int(reply[0])
            flat: list[bytes] = reply[1]
            members = flat[::2]
            looks = await self._look(members) if members else []
            for member, deadline, (state, agent_id, pttl) in zip(
                members, flat[1::2], looks, strict=True
            ):
                if not _kept_active(state):
                    undue.append(member)
                    stale.append(member)
                elif state == _ENQUEUED:
                    undue.append(member)
                elif pttl != _NO_LEASE:
                    moves += [member, deadline, self._lapses(now, pttl)]
                elif len(found) < limit and _serves(agent_id, agent_ids):
                    found[member.decode()] = None
            if len(members) < _DUE_PAGE or len(found) == limit:
                break
            offset += len(members)
        if moves:
            await self._reschedule(keys=[deadlines], args=moves)
        if undue:
            await self._drop(now, undue, stale)
        return now

    async def _walk_active(
        self, now: int, limit: int, agent_ids: frozenset[str] | None, found: dict[str, None]
    ) -> None:
        """Step 3 of claimable: the next stretch of the full pass of the active set."""
        active, deadlines = self._keys.active_runs, self._keys.lease_deadlines
        cursor = self._pass_cursor
        recorded: dict[bytes, int] = {}  # deadlines of the members that had none
        stale: list[bytes] = []
        for _ in range(_PASS_PAGES):
            cursor, batch = await self._client.sscan(active, cursor, count=_PASS_PAGE)
            members = cast(list[bytes], batch)
            known: list[float | None] = []
            if members:
                known = await self._client.zmscore(deadlines, cast(list[Any], members))
            untracked = [m for m, deadline in zip(members, known, strict=True) if deadline is None]
            looks = await self._look(untracked) if untracked else []
            for member, (state, agent_id, pttl) in zip(untracked, looks, strict=True):
                if not _kept_active(state):
                    stale.append(member)
                elif state == _ENQUEUED:
                    continue  # its thread makes it due when it becomes runnable
                elif pttl != _NO_LEASE:
                    recorded[member] = self._lapses(now, pttl)
                else:
                    recorded[member] = now
                    if len(found) < limit and _serves(agent_id, agent_ids):
                        found[member.decode()] = None
            if cursor == 0 or len(found) == limit:
                break
        if recorded:  # NX: a deadline a writer recorded meanwhile knows better
            await self._client.zadd(deadlines, cast(dict[Any, Any], recorded), nx=True)
        if stale:
            await self._drop(now, [], stale)
        self._pass_cursor = cursor
        if cursor == 0:
            self._next_pass = time.monotonic() + FULL_PASS_INTERVAL_S

    async def _drop(self, now: int, undue: list[bytes], stale: list[bytes]) -> None:
        """Step 4 of claimable: remove `undue` from the deadline set and `stale` from the
        active set, read their state again, add back what became runnable (or enqueued)."""
        async with self._client.pipeline(transaction=False) as pipe:
            if undue:
                pipe.zrem(self._keys.lease_deadlines, *undue)
            if stale:
                pipe.srem(self._keys.active_runs, *stale)
            await pipe.execute()
        # Only once the removals are done (on Redis Cluster a pipeline's commands
        # on different nodes may run in any order).
        members = list(dict.fromkeys([*undue, *stale]))
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hget(self._keys.run(member.decode()), RunField.STATE.value)
            states: dict[bytes, bytes | None] = dict(
                zip(members, await pipe.execute(), strict=True)
            )
        back_active = [member for member in stale if _kept_active(states[member])]
        back_due = {member: now for member in members if _runnable(states[member])}
        if back_active or back_due:
            async with self._client.pipeline(transaction=False) as pipe:
                if back_active:
                    pipe.sadd(self._keys.active_runs, *back_active)
                if back_due:
                    pipe.zadd(self._keys.lease_deadlines, cast(dict[Any, Any], back_due), nx=True)
                await pipe.execute()

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
        unknown is dropped by claimable as usual. A runnable run is then due
        in the lease deadline set at once (it may have no owner now).
        """
        if not reason:
            raise ValueError("a cancel request needs a reason")
        with store_errors():
            await self._client.sadd(self._keys.active_runs, run_id)
            reply = await self._cancel(
                keys=[self._keys.run(run_id)],
                args=[reason, time.time_ns() // 1_000_000, self._keys.control(run_id)],
            )
            if reply[0] == scripts.NOT_FOUND:
                raise RunNotFound(run_id)
            record = run_from_hash(run_id, pairs(reply[1]))
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.sadd(self._keys.active_runs, run_id)
                if record.state.runnable:
                    pipe.zadd(self._keys.lease_deadlines, {run_id: int(reply[2])})
                await pipe.execute()
        return record

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
        """RedisThreads.start_thread_run, then the lease deadlines of the runs it touched.

        A new run that became the thread's active run holds a lease whose
        deadline the script does not tell: it is due at once (0) unless a
        deadline is recorded, and the next sweep records its lease's. So is
        the run an INTERRUPT or ROLLBACK asked to stop, which may have become
        runnable without a lease. A crash before this leaves both in the
        active set, for claimable's full pass.
        """
        started = await self._threads.start_thread_run(record, policy)
        due = [started.interrupted_run_id] if started.interrupted_run_id else []
        if started.run.state.runnable:
            due.append(started.run.run_id)
        if due:
            with store_errors():
                await self._client.zadd(self._keys.lease_deadlines, dict.fromkeys(due, 0), nx=True)
        return started

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
