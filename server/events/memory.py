"""MemoryEventLog: the embedded EventLog, for one process without Redis.

It keeps the AgentEvent objects it is given (no copy, for speed): callers
and listeners must not mutate an event after appending or receiving it.
Everything runs on the event loop without awaiting, so each method is atomic
and listeners are called synchronously right after an append commits.

Retention: a run that reached a terminal state disappears terminal_ttl_s
later. Expiry is lazy (every access checks the deadline) plus a cheap sweep
on create_run and append, so the memory of ended runs is eventually freed.

Leases are deadlines on the same injectable clock: a lease is held while
clock() <= its deadline. When held, it is always at the run's epoch: only
claim moves the epoch, and only while no lease is held.
"""

from __future__ import annotations

import bisect
import dataclasses
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
    StaleEpoch,
)
from server.events.codec import Batch, check_consecutive
from server.events.log import (
    ControlListener,
    Listener,
    RunPageCursor,
    RunRecord,
    RunState,
    Subscription,
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`retain_events` > 0 keeps only that many newest events per run.

        `lease_ttl_s` is how long a run's owner holds it without renewing.
        `clock` (seconds, monotonic) times retention and leases; tests may
        inject one.
        """
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s}")
        self._terminal_ttl_s = terminal_ttl_s
        self._retain_events = retain_events
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        # (create_time_ms, run_id) ascending; may hold entries of expired runs,
        # which list_runs drops when it meets them.
        self._order: list[tuple[int, str]] = []
        # (deadline, run_id) in deadline order: the TTL is constant, so runs
        # become terminal in the order they expire.
        self._expiries: deque[tuple[float, str]] = deque()
        # Per run, its subscriptions in registration order (a dict for O(1) removal).
        self._subscriptions: dict[str, dict[_MemorySubscription[Listener], None]] = {}
        self._controls: dict[str, dict[_MemorySubscription[ControlListener], None]] = {}
        # Ids of the runnable runs (claimable's candidates), kept exact: every
        # method is atomic here, so no lazy cleanup is needed.
        self._active: dict[str, None] = {}

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        self._sweep()
        existing = self._find(record.run_id)
        if existing is not None:
            return existing.snapshot(), False
        self._runs[record.run_id] = _Run(
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
            self._runs[record.run_id].lease_until = self._clock() + self._lease_ttl_s
            self._active[record.run_id] = None
        entry = (record.create_time_ms, record.run_id)
        position = bisect.bisect_left(self._order, entry)
        # The entry may survive from an expired run with this id and create time.
        if position == len(self._order) or self._order[position] != entry:
            self._order.insert(position, entry)
        return record, True

    async def get_run(self, run_id: str) -> RunRecord:
        return self._get(run_id).snapshot()

    async def head(self, run_id: str) -> int:
        return self._get(run_id).next_index

    async def list_runs(
        self,
        *,
        agent_id: str = "",
        states: frozenset[RunState] = frozenset(),
        limit: int,
        after: RunPageCursor | None = None,
    ) -> list[RunRecord]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        end = len(self._order)
        if after is not None:
            end = bisect.bisect_left(self._order, (after.create_time_ms, after.run_id))
        page: list[RunRecord] = []
        stale: list[tuple[int, str]] = []
        for position in range(end - 1, -1, -1):
            create_time_ms, run_id = entry = self._order[position]
            run = self._find(run_id)
            if run is None or run.record.create_time_ms != create_time_ms:
                stale.append(entry)  # expired, or an older run that had the same id
                continue
            if agent_id and run.record.agent_id != agent_id:
                continue
            if states and run.state not in states:
                continue
            page.append(run.snapshot(checkpoint=False))
            if len(page) == limit:
                break
        for entry in stale:
            del self._order[bisect.bisect_left(self._order, entry)]
        return page

    async def append(
        self,
        run_id: str,
        epoch: int,
        events: Sequence[AgentEvent],
        *,
        state: RunState | None = None,
        error: str = "",
        checkpoint: bytes | None = None,
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
            run.events.extend(batch)
            run.next_index += len(batch)
        if checkpoint is not None:
            run.checkpoint = checkpoint
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
                run.expires_at = self._clock() + self._terminal_ttl_s
                self._expiries.append((run.expires_at, run_id))
        run.update_time_ms = time.time_ns() // 1_000_000
        self._trim(run)
        if batch:
            self._notify(run_id, batch)
        return run.next_index

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        run = self._get(run_id)
        if offset < run.earliest_index:
            raise OffsetExpired(run_id, offset, run.earliest_index, run.next_index)
        start = offset - run.base
        return Batch(run.events[start : start + limit])

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        # No RunNotFound here: an observer may subscribe before it reads the run.
        return _MemorySubscription(self._subscriptions, run_id, listener)

    async def claim(self, run_id: str, owner: str, *, suspended: bool = False) -> RunRecord | None:
        run = self._find(run_id)
        if run is None or self._lease_held(run):
            return None
        if not (run.state.runnable or (suspended and run.state is RunState.SUSPENDED)):
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
        if not run.cancel_reason:
            run.cancel_reason = reason
            run.update_time_ms = time.time_ns() // 1_000_000
        # A copy: a listener may close its subscription while being notified.
        for subscription in tuple(self._controls.get(run_id, ())):
            try:
                subscription.listener.on_cancel(run.cancel_reason)
            except Exception:
                # The request is stored; one broken listener must not fail it or starve others.
                logger.exception("control listener of run %s failed", run_id)
        return run.snapshot()

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> Subscription:
        return _MemorySubscription(self._controls, run_id, listener)

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
            deadline, run_id = self._expiries.popleft()
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
