"""MemoryEventLog: the embedded EventLog, for one process without Redis.

It keeps the AgentEvent objects it is given (no copy, for speed): callers
and listeners must not mutate an event after appending or receiving it.
Everything runs on the event loop without awaiting, so each method is atomic
and listeners are called synchronously right after an append commits.

Retention: a run that reached a terminal state disappears terminal_ttl_s
later (or its own terminal_ttl_ms). Expiry is lazy (every access checks the
deadline) plus a cheap sweep on create_run and append, so the memory of
ended runs is eventually freed. An idle thread disappears thread_idle_ttl_s
after it became idle, if that is set; a run starting on it keeps it.

Leases are deadlines on the same injectable clock: a lease is held while
clock() <= its deadline. When held, it is always at the run's epoch: only
claim moves the epoch, and only while no lease is held.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from keel.v1.agent_service_pb2 import AgentEvent

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
from server.events.codec import Batch, check_consecutive
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

logger = logging.getLogger(__name__)

# Trimmed events are dropped from the front of a run's list in chunks, since
# deleting a list prefix is O(len); at most this many dead events are kept.
_COMPACT_AFTER = 1024


@dataclass(slots=True, eq=False)
class _Run:
    """A run's mutable state; `record` holds the fields that never change."""

    record: RunRecord
    state: RunState
    epoch: int
    owner: str
    error: str
    update_time_ms: int
    next_index: int
    earliest_index: int
    checkpoint: bytes
    cancel_reason: str
    decisions: bytes
    interrupted_by: str = ""
    rollback: bool = False
    last_step: int = 0  # of the last event of a live-only run (its events are not kept)
    last_attempt: int = 0
    goal_progress: str = ""
    events: list[AgentEvent] = field(default_factory=list)
    base: int = 0  # index of events[0]; <= earliest_index
    counters: dict[str, int] = field(default_factory=dict)
    once_keys: set[str] = field(default_factory=set)  # incr_counter's idempotency keys
    tools: dict[str, bytes] = field(default_factory=dict)  # the tool journal
    resumes: dict[str, bytes] = field(default_factory=dict)  # Resume request id -> record
    expires_at: float | None = None  # clock() deadline, set by a terminal state
    lease_until: float | None = None  # clock() deadline of the owner's lease; None = dropped

    def snapshot(self, *, checkpoint: bool = True) -> RunRecord:
        return dataclasses.replace(
            self.record,
            state=self.state,
            epoch=self.epoch,
            owner=self.owner,
            error=self.error,
            update_time_ms=self.update_time_ms,
            next_index=self.next_index,
            earliest_index=self.earliest_index,
            checkpoint=self.checkpoint if checkpoint else b"",
            cancel_reason=self.cancel_reason,
            decisions=self.decisions,
            interrupted_by=self.interrupted_by,
            rollback=self.rollback,
            last_step=self.last_step,
            last_attempt=self.last_attempt,
            goal_progress=self.goal_progress,
        )


@dataclass(slots=True, eq=False)
class _Thread:
    """A thread's mutable state; `record` holds the fields that never change."""

    record: ThreadRecord
    update_time_ms: int
    active_run_id: str = ""
    queue: deque[str] = field(default_factory=deque)  # run ids waiting for their turn
    messages: list[bytes] = field(default_factory=list)  # the history's entries
    # Entries that came while a run had the thread (late task results): they join
    # the history after the active run's own messages, when it ends.
    pending: list[bytes] = field(default_factory=list)
    runs: list[tuple[int, str]] = field(default_factory=list)  # (create_time_ms, run_id) sorted
    expires_at: float | None = None  # clock() deadline while idle, with an idle TTL

    def snapshot(self) -> ThreadRecord:
        return dataclasses.replace(
            self.record,
            update_time_ms=self.update_time_ms,
            active_run_id=self.active_run_id,
            queued_run_ids=tuple(self.queue),
            message_count=len(self.messages),
        )


_L = TypeVar("_L")  # Listener or ControlListener


class _MemorySubscription(Generic[_L]):
    """A listener's registration in one of the log's registries (events or control)."""

    def __init__(
        self, registry: dict[str, dict[_MemorySubscription[_L], None]], run_id: str, listener: _L
    ) -> None:
        self._registry: dict[str, dict[_MemorySubscription[_L], None]] = registry
        self.run_id = run_id
        self.listener: _L = listener
        registry.setdefault(run_id, {})[self] = None

    async def close(self) -> None:
        subscriptions = self._registry.get(self.run_id)
        if subscriptions is None or self not in subscriptions:
            return  # closed already
        del subscriptions[self]
        if not subscriptions:
            del self._registry[self.run_id]


class MemoryEventLog:
    """An EventLog in this process's memory; see the module docstring."""

    def __init__(
        self,
        *,
        terminal_ttl_s: float = 86_400,
        retain_events: int = 0,
        lease_ttl_s: float = 5.0,
        thread_idle_ttl_s: float = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`retain_events` > 0 keeps only that many newest events per run.

        `lease_ttl_s` is how long a run's owner holds it without renewing.
        `thread_idle_ttl_s` > 0 is how long a thread without an active run
        lives. `clock` (seconds, monotonic) times retention and leases; tests
        may inject one.
        """
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self._terminal_ttl_s = terminal_ttl_s
        self._retain_events = retain_events
        self._lease_ttl_s = lease_ttl_s
        self._thread_idle_ttl_s = thread_idle_ttl_s
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        # (create_time_ms, run_id) ascending; may hold entries of expired runs,
        # which list_runs drops when it meets them.
        self._order: list[tuple[int, str]] = []
        # (deadline, run_id), a heap: runs may have their own retention.
        self._expiries: list[tuple[float, str]] = []
        # Per run, its subscriptions in registration order (a dict for O(1) removal).
        self._subscriptions: dict[str, dict[_MemorySubscription[Listener], None]] = {}
        self._controls: dict[str, dict[_MemorySubscription[ControlListener], None]] = {}
        # Ids of the runnable runs (claimable's candidates), kept exact: every
        # method is atomic here, so no lazy cleanup is needed.
        self._active: dict[str, None] = {}
        self._threads: dict[str, _Thread] = {}
        # (create_time_ms, thread_id) ascending; entries of deleted or expired
        # threads are dropped by list_threads when it meets them.
        self._thread_order: list[tuple[int, str]] = []

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        self._sweep()
        existing = self._find(record.run_id)
        if existing is not None:
            return existing.snapshot(), False
        self._store(record)
        return record, True

    def _store(self, record: RunRecord) -> _Run:
        """Keep a new run: owned with a fresh lease if it is runnable."""
        run = self._runs[record.run_id] = _Run(
            record=record,
            state=record.state,
            epoch=record.epoch,
            owner=record.owner,
            error=record.error,
            update_time_ms=record.update_time_ms,
            next_index=record.next_index,
            earliest_index=record.earliest_index,
            checkpoint=record.checkpoint,
            cancel_reason=record.cancel_reason,
            decisions=record.decisions,
            base=record.next_index,
        )
        if record.state.runnable:
            run.lease_until = self._clock() + self._lease_ttl_s
            self._active[record.run_id] = None
        # The entry may survive from an expired run with this id and create time.
        _insert_once(self._order, (record.create_time_ms, record.run_id))
        return run

    async def get_run(self, run_id: str) -> RunRecord:
        return self._get(run_id).snapshot()

    async def head(self, run_id: str) -> int:
        return self._get(run_id).next_index

    async def history(self, run_id: str) -> tuple[int, str]:
        return self._get(run_id).next_index, ""  # this log never goes back: no lineage

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
        order = self._order
        if thread_id:
            thread = self._find_thread(thread_id)
            order = [] if thread is None else thread.runs

        def accept(run_id: str, create_time_ms: int) -> RunRecord | _Stale | None:
            run = self._find(run_id)
            if run is None or run.record.create_time_ms != create_time_ms:
                return STALE  # expired, or an older run that had the same id
            if agent_id and run.record.agent_id != agent_id:
                return None
            if schedule_id and run.record.schedule_id != schedule_id:
                return None
            if tenant is not None and run.record.tenant != tenant:
                return None
            if states and run.state not in states:
                return None
            return run.snapshot(checkpoint=False)

        cursor = None if after is None else (after.create_time_ms, after.run_id)
        return _walk(order, limit=limit, after=cursor, accept=accept)

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
        self._sweep()
        run = self._get(run_id)
        if epoch != run.epoch:
            raise StaleEpoch(run_id, epoch, run.epoch)
        batch = list(events)
        if batch:
            check_consecutive(batch)
            first = batch[0].index
            if first != run.next_index:
                if self._is_replay(run, batch):
                    return run.next_index
                raise IndexConflict(run_id, first, run.next_index)
            if run.record.live_only:
                run.base += len(batch)  # published below, never kept
                run.last_step, run.last_attempt = batch[-1].step, batch[-1].attempt
            else:
                run.events.extend(batch)
            run.next_index += len(batch)
        if checkpoint is not None:
            run.checkpoint = checkpoint
        if goal_progress is not None:
            run.goal_progress = goal_progress
        if state is not None:
            run.state = state
            run.error = error
            if state.runnable:
                self._active[run_id] = None
            else:
                # Nobody executes a suspended or ended run: a Resume makes it claimable at once.
                run.lease_until = None
                self._active.pop(run_id, None)
            if state.terminal:
                ttl_s = run.record.terminal_ttl_ms / 1000 or self._terminal_ttl_s
                run.expires_at = self._clock() + ttl_s
                heapq.heappush(self._expiries, (run.expires_at, run_id))
                if run.record.thread_id:
                    self._release_thread(run, thread_messages)
        run.update_time_ms = time.time_ns() // 1_000_000
        self._trim(run)
        if batch:
            self._notify(run_id, batch)
        return run.next_index

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        run = self._get(run_id)
        if run.record.live_only and offset < run.next_index:
            raise RunNotResumable(run_id, offset, run.next_index)
        if offset < run.earliest_index:
            raise OffsetExpired(run_id, offset, run.earliest_index, run.next_index)
        start = offset - run.base
        return Batch(run.events[start : start + limit])

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        # No RunNotFound here: an observer may subscribe before it reads the run.
        return _MemorySubscription(self._subscriptions, run_id, listener)

    async def claim(self, run_id: str, owner: str, *, force: bool = False) -> RunRecord | None:
        run = self._find(run_id)
        if run is None or (self._lease_held(run) and not force) or not run.state.runnable:
            return None
        run.epoch += 1
        run.owner = owner
        run.lease_until = self._clock() + self._lease_ttl_s
        return run.snapshot()

    async def renew(self, run_id: str, epoch: int) -> bool:
        run = self._find(run_id)
        if run is None or not run.state.runnable or run.epoch != epoch:
            return False
        run.lease_until = self._clock() + self._lease_ttl_s
        return True

    async def release(self, run_id: str, epoch: int) -> None:
        run = self._find(run_id)
        if run is not None and run.epoch == epoch:
            run.lease_until = None

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
        run = self._get(run_id)
        if run.state is not RunState.SUSPENDED or run.epoch != expected_epoch:
            raise ConcurrentModification(run_id)
        run.epoch += 1
        run.decisions = decisions
        run.update_time_ms = time.time_ns() // 1_000_000
        if request_id:
            run.resumes[request_id] = request_record
        if resume:
            run.state = RunState.QUEUED
            run.owner = owner
            run.lease_until = self._clock() + self._lease_ttl_s
            self._active[run_id] = None
        return run.snapshot()

    async def resume_request(self, run_id: str, request_id: str) -> bytes | None:
        run = self._find(run_id)
        return None if run is None else run.resumes.get(request_id)

    async def claimable(self, limit: int, *, agent_ids: frozenset[str] | None = None) -> list[str]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        found: list[str] = []
        for run_id in tuple(self._active):  # a copy: _find may drop expired runs
            run = self._find(run_id)
            if run is None:
                del self._active[run_id]
            elif not self._lease_held(run) and (
                agent_ids is None or run.record.agent_id in agent_ids
            ):
                found.append(run_id)
                if len(found) == limit:
                    break
        return found

    async def journal_tool(self, run_id: str, epoch: int, tool_call_id: str, result: bytes) -> None:
        run = self._get(run_id)
        if epoch != run.epoch:
            raise StaleEpoch(run_id, epoch, run.epoch)
        run.tools.setdefault(tool_call_id, result)

    async def journaled_tool(self, run_id: str, tool_call_id: str) -> bytes | None:
        run = self._find(run_id)
        return None if run is None else run.tools.get(tool_call_id)

    async def request_cancel(self, run_id: str, reason: str) -> RunRecord:
        if not reason:
            raise ValueError("a cancel request needs a reason")
        run = self._get(run_id)
        if run.state.terminal:
            return run.snapshot()
        self._ask_to_cancel(run, reason)
        return run.snapshot()

    def _ask_to_cancel(self, run: _Run, reason: str) -> None:
        """Store a cancel request (the first reason wins), make an ownerless run
        runnable so that its abort gets written, and tell the owner."""
        run_id = run.record.run_id
        if not run.cancel_reason:
            run.cancel_reason = reason
            run.update_time_ms = time.time_ns() // 1_000_000
        if run.state in (RunState.SUSPENDED, RunState.ENQUEUED):
            run.state = RunState.QUEUED
            run.lease_until = None
            self._active[run_id] = None
        # A copy: a listener may close its subscription while being notified.
        for subscription in tuple(self._controls.get(run_id, ())):
            try:
                subscription.listener.on_cancel(run.cancel_reason)
            except Exception:
                # The request is stored; one broken listener must not fail it or starve others.
                logger.exception("control listener of run %s failed", run_id)

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> Subscription:
        return _MemorySubscription(self._controls, run_id, listener)

    # Threads.

    async def create_thread(self, record: ThreadRecord) -> tuple[ThreadRecord, bool]:
        existing = self._find_thread(record.thread_id)
        if existing is not None:
            return existing.snapshot(), False
        thread = _Thread(record=record, update_time_ms=record.update_time_ms)
        self._threads[record.thread_id] = thread
        self._idle(thread)
        _insert_once(self._thread_order, (record.create_time_ms, record.thread_id))
        return record, True

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        return self._get_thread(thread_id).snapshot()

    async def list_threads(
        self,
        *,
        resource_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: ThreadPageCursor | None = None,
    ) -> list[ThreadRecord]:

        def accept(thread_id: str, create_time_ms: int) -> ThreadRecord | _Stale | None:
            thread = self._find_thread(thread_id)
            if thread is None or thread.record.create_time_ms != create_time_ms:
                return STALE  # deleted or expired
            if resource_id and thread.record.resource_id != resource_id:
                return None
            if tenant is not None and thread.record.owner != tenant:
                return None
            return thread.snapshot()

        cursor = None if after is None else (after.create_time_ms, after.thread_id)
        return _walk(self._thread_order, limit=limit, after=cursor, accept=accept)

    async def delete_thread(self, thread_id: str) -> None:
        thread = self._get_thread(thread_id)
        waiting = thread.active_run_id or next(iter(thread.queue), "")
        if waiting:
            raise ThreadBusy(thread_id, waiting)
        del self._threads[thread_id]

    async def thread_messages(self, thread_id: str, start: int, stop: int) -> list[bytes]:
        if start < 0 or stop < start:
            raise ValueError(f"bad range [{start}, {stop})")
        return self._get_thread(thread_id).messages[start:stop]

    async def start_thread_run(self, record: RunRecord, policy: BusyPolicy) -> ThreadRunStart:
        self._sweep()
        thread = self._get_thread(record.thread_id)
        existing = self._find(record.run_id)
        if existing is not None:
            return ThreadRunStart(existing.snapshot(), created=False)
        now_ms = time.time_ns() // 1_000_000
        active = self._find(thread.active_run_id) if thread.active_run_id else None
        if active is None:
            self._store(record)
            thread.active_run_id = record.run_id
            thread.expires_at = None
            started = ThreadRunStart(record, created=True)
        elif policy is BusyPolicy.REJECT:
            raise ThreadBusy(record.thread_id, thread.active_run_id)
        else:
            enqueued = dataclasses.replace(record, state=RunState.ENQUEUED, owner="")
            self._store(enqueued)
            thread.queue.append(record.run_id)
            started = ThreadRunStart(enqueued, created=True)
            if policy in (BusyPolicy.INTERRUPT, BusyPolicy.ROLLBACK) and not active.state.terminal:
                verb = "rolled back" if policy is BusyPolicy.ROLLBACK else "interrupted"
                if not active.cancel_reason:
                    active.interrupted_by = record.run_id
                active.rollback |= policy is BusyPolicy.ROLLBACK
                self._ask_to_cancel(active, f"{verb} by run {record.run_id}")
                started = dataclasses.replace(started, interrupted_run_id=active.record.run_id)
        thread.update_time_ms = now_ms
        _insert_once(thread.runs, (record.create_time_ms, record.run_id))
        return started

    def _release_thread(self, run: _Run, messages: Sequence[bytes]) -> None:
        """Step 5 of append: an ended run leaves its thread (see EventLog.append)."""
        thread = self._find_thread(run.record.thread_id)
        if thread is None:
            return
        run_id = run.record.run_id
        thread.update_time_ms = time.time_ns() // 1_000_000
        if thread.active_run_id != run_id:
            if run_id in thread.queue:
                thread.queue.remove(run_id)
            return
        if not run.rollback:
            thread.messages.extend(messages)
        thread.messages.extend(thread.pending)
        thread.pending.clear()
        thread.active_run_id = ""
        while thread.queue:
            queued = self._find(thread.queue.popleft())
            if queued is not None and queued.state is RunState.ENQUEUED:
                queued.state = RunState.QUEUED  # ownerless: claimable at once
                self._active[queued.record.run_id] = None
                thread.active_run_id = queued.record.run_id
                break
        if not thread.active_run_id:
            self._idle(thread)

    def add_to_thread(self, thread_id: str, entry: bytes) -> None:
        """Add an entry from outside any run (a late task result) to a thread: to its
        history if it is idle, else after the active run's own messages, when that
        run ends. A thread that is gone takes nothing. (Synchronous: the memory
        task store calls it inside its own atomic steps.)"""
        thread = self._find_thread(thread_id)
        if thread is None:
            return
        if thread.active_run_id:
            thread.pending.append(entry)
        else:
            thread.messages.append(entry)
            thread.update_time_ms = time.time_ns() // 1_000_000
            self._idle(thread)

    def has_run(self, run_id: str) -> bool:
        """Whether the run exists (its retention time has not passed)."""
        return self._find(run_id) is not None

    def _idle(self, thread: _Thread) -> None:
        if self._thread_idle_ttl_s > 0:
            thread.expires_at = self._clock() + self._thread_idle_ttl_s

    def _find_thread(self, thread_id: str) -> _Thread | None:
        """The thread, or None if it never existed, was deleted or expired while idle."""
        thread = self._threads.get(thread_id)
        expires_at = None if thread is None else thread.expires_at
        if expires_at is not None and expires_at <= self._clock():
            del self._threads[thread_id]
            return None
        return thread

    def _get_thread(self, thread_id: str) -> _Thread:
        thread = self._find_thread(thread_id)
        if thread is None:
            raise ThreadNotFound(thread_id)
        return thread

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int:
        run = self._get(run_id)
        if once_key:
            if once_key in run.once_keys:
                return run.counters.get(key, 0)
            run.once_keys.add(once_key)
        value = run.counters.get(key, 0) + 1
        run.counters[key] = value
        return value

    async def get_counter(self, run_id: str, key: str) -> int:
        run = self._find(run_id)
        return 0 if run is None else run.counters.get(key, 0)

    async def ping(self) -> None:
        """Memory is always reachable."""

    async def close(self) -> None:
        self._subscriptions.clear()
        self._controls.clear()

    def _find(self, run_id: str) -> _Run | None:
        """The run, or None if it never existed or its retention time passed."""
        run = self._runs.get(run_id)
        if run is not None and run.expires_at is not None and run.expires_at <= self._clock():
            del self._runs[run_id]
            return None
        return run

    def _lease_held(self, run: _Run) -> bool:
        return run.lease_until is not None and self._clock() <= run.lease_until

    def _get(self, run_id: str) -> _Run:
        run = self._find(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def _sweep(self) -> None:
        """Forget runs whose retention time passed (lazy expiry alone would keep unread ones)."""
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            deadline, run_id = heapq.heappop(self._expiries)
            run = self._runs.get(run_id)
            if run is not None and run.expires_at == deadline:
                del self._runs[run_id]

    @staticmethod
    def _is_replay(run: _Run, batch: list[AgentEvent]) -> bool:
        """Whether `batch` is already stored at its indices (a retry of a committed append)."""
        start = batch[0].index
        if start < run.earliest_index or start + len(batch) > run.next_index:
            return False
        stored = run.events[start - run.base : start - run.base + len(batch)]
        return stored == batch

    def _trim(self, run: _Run) -> None:
        if self._retain_events <= 0:
            return
        earliest = run.next_index - self._retain_events
        if earliest <= run.earliest_index:
            return
        run.earliest_index = earliest
        if earliest - run.base > _COMPACT_AFTER:
            del run.events[: earliest - run.base]
            run.base = earliest

    def _notify(self, run_id: str, events: list[AgentEvent]) -> None:
        batch = Batch(events)  # one encoding, shared by every listener that sends it
        # A copy: a listener may close its subscription while being notified.
        for subscription in tuple(self._subscriptions.get(run_id, ())):
            try:
                subscription.listener.on_events(batch)
            except Exception:
                # The append has committed; one broken listener must not fail it or starve others.
                logger.exception("listener of run %s failed", run_id)


def _insert_once(order: list[tuple[int, str]], entry: tuple[int, str]) -> None:
    """Insert `entry` into the sorted `order` unless it is there."""
    position = bisect.bisect_left(order, entry)
    if position == len(order) or order[position] != entry:
        order.insert(position, entry)


class _Stale(enum.Enum):
    """What _walk's `accept` answers for an entry whose item is gone."""

    STALE = "stale"


STALE = _Stale.STALE
_T = TypeVar("_T")


def _walk(
    order: list[tuple[int, str]],
    *,
    limit: int,
    after: tuple[int, str] | None,
    accept: Callable[[str, int], _T | _Stale | None],
) -> list[_T]:
    """Up to `limit` items of a sorted (create_time_ms, id) index, newest first, before `after`.

    `accept(id, create_time_ms)` returns the item to list, None to skip it,
    or STALE for an entry whose item is gone, which is then removed.
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    end = len(order) if after is None else bisect.bisect_left(order, after)
    page: list[_T] = []
    stale: list[tuple[int, str]] = []
    for position in range(end - 1, -1, -1):
        create_time_ms, item_id = entry = order[position]
        item = accept(item_id, create_time_ms)
        if item is STALE:
            stale.append(entry)
        elif item is not None:
            page.append(item)
            if len(page) == limit:
                break
    for entry in stale:
        del order[bisect.bisect_left(order, entry)]
    return page
