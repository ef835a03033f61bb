"""The event log: the record of every run and of every event it emitted.

A run's events have dense indices 0, 1, 2, ... An event is appended (and so
committed) before anyone is told about it; notifications to listeners are a
doorbell, the log is the truth. Two implementations pass one contract suite
(tests/contract): MemoryEventLog (the embedded default) and RedisEventLog.

The log also holds each run's record (state, epoch, next index, ...): an
append checks the writer's epoch and the expected next index and may move
the run to a new state in the same atomic step, so the events and the state
never disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from keel.v1.agent_service_pb2 import AgentEvent


class RunState(enum.StrEnum):
    """Where a run is in its life; the terminal states start its retention time."""

    QUEUED = "queued"  # accepted, first step not started
    RUNNING = "running"  # executing
    SUSPENDED = "suspended"  # waiting for a human's decision (Resume)
    SUCCEEDED = "succeeded"  # ended with a `finish` event
    FAILED = "failed"  # ended with an `error` event
    CANCELLED = "cancelled"  # ended with an `abort` event

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as the log stores it."""

    run_id: str
    agent_id: str
    input: str
    request_id: str
    state: RunState
    create_time_ms: int
    update_time_ms: int
    next_index: int = 0  # index of the next event: the number of events appended so far
    earliest_index: int = 0  # smallest index still retained (> 0 only after trimming)
    epoch: int = 1  # fencing token of the current owner; appends must carry it
    owner: str = ""  # id of the instance that executes the run
    error: str = ""  # error message (FAILED) or reason (CANCELLED)


@dataclass(frozen=True, slots=True)
class RunPageCursor:
    """Where a page of ListRuns ends: runs are ordered by (create_time_ms, run_id), newest first."""

    create_time_ms: int
    run_id: str


class Listener(Protocol):
    """Receives a run's committed events as they are appended.

    Both methods are called on the event loop and must not block or await.
    """

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        """Consecutive events just committed, in index order."""

    def on_gap(self) -> None:
        """Notifications may have been lost (the pub/sub connection dropped): re-read the log.

        Called only once notifications flow again, so a re-read started now
        misses nothing committed later.
        """


class Subscription(Protocol):
    """A listener's registration for one run's notifications."""

    async def close(self) -> None:
        """Stop notifying; safe to call more than once."""


class EventLog(Protocol):
    """Runs and their events; see the module docstring."""

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Store a new run unless one with this run_id exists.

        Returns the stored record and whether this call created it. Creating
        is idempotent: a second call with the same run_id returns the first
        record unchanged (this is how request_id idempotency works, since
        run ids derive from request ids).
        """

    async def get_run(self, run_id: str) -> RunRecord:
        """The run's record. Raises RunNotFound."""

    async def list_runs(
        self,
        *,
        agent_id: str = "",
        states: frozenset[RunState] = frozenset(),
        limit: int,
        after: RunPageCursor | None = None,
    ) -> list[RunRecord]:
        """Up to `limit` (> 0) runs, newest first, strictly after `after`, filtered.

        An empty `agent_id` or `states` does not filter. Runs whose retention
        time passed are not listed.
        """

    async def append(
        self,
        run_id: str,
        epoch: int,
        events: Sequence[AgentEvent],
        *,
        state: RunState | None = None,
        error: str = "",
    ) -> int:
        """Append events atomically and return the run's new next index.

        1. Check `epoch` equals the run's epoch, else raise StaleEpoch.
        2. Check events[0].index equals the run's next index, else raise
           IndexConflict (indices within `events` must be consecutive).
        3. Store the events, advance next_index, and if `state` is given move
           the run to it (recording `error`); a terminal state starts the
           run's retention TTL.
        4. Trim to the configured retention of events per run, if any,
           advancing earliest_index.
        5. Only then notify listeners.
        `events` may be empty to change only the state; listeners are then
        not notified. An exact replay of an already committed batch (a retry
        after a lost reply) writes nothing and returns the next index.
        Raises RunNotFound; ValueError if the indices are not consecutive.
        """

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        """Up to `limit` events with index >= offset, in order.

        Raises OffsetExpired when offset < the run's earliest_index, RunNotFound
        for an unknown run. An offset at or past the head returns [].
        """

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        """Register `listener` for the run's notifications.

        When this returns, every event committed afterwards will reach the
        listener (or the listener gets on_gap), so a reader that subscribes
        first and reads the log second misses nothing.
        """

    async def incr_counter(self, run_id: str, key: str) -> int:
        """Increment the run's counter `key` and return its new value (for test tools)."""

    async def get_counter(self, run_id: str, key: str) -> int:
        """The run's counter `key`, 0 if never incremented."""

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections and background tasks; safe to call more than once."""
