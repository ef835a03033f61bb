"""The event log: the record of every run and of every event it emitted.

A run's events have dense indices 0, 1, 2, ... An event is appended (and so
committed) before anyone is told about it; notifications to listeners are a
doorbell, the log is the truth. Three implementations pass one contract suite
(tests/contract): MemoryEventLog (the embedded default), RedisEventLog and
PostgresEventLog.

The log also holds each run's record (state, epoch, next index, ...): an
append checks the writer's epoch and the expected next index and may move
the run to a new state in the same atomic step, so the events and the state
never disagree.

Threads (conversations) live in the same store, because a run on a thread
changes it atomically with its own record: the run's terminal append adds
its messages to the thread and hands the thread to the next queued run, and
starting a run on a thread decides, in one step, whether it becomes the
thread's active run, waits in its queue, or is refused.
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
    ENQUEUED = "enqueued"  # waits in its thread's queue for the active run to end (no owner)
    RUNNING = "running"  # executing
    SUSPENDED = "suspended"  # waiting for a human's decision (Resume)
    SUCCEEDED = "succeeded"  # ended with a `finish` event
    FAILED = "failed"  # ended with an `error` event
    CANCELLED = "cancelled"  # ended with an `abort` event

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def runnable(self) -> bool:
        """An owner should be executing the run: only these states hold a lease or are claimed."""
        return self in _RUNNABLE


_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
_RUNNABLE = frozenset({RunState.QUEUED, RunState.RUNNING})


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
    checkpoint: bytes = b""  # the executor's last checkpoint (opaque here), committed with events
    cancel_reason: str = ""  # non-empty once CancelRun asked; the owner then aborts the run
    decisions: bytes = b""  # Resume's decisions so far (opaque here: the executor's JSON)
    thread_id: str = ""  # the thread the run was made on; "" for a run on its own
    live_only: bool = False  # events go to listeners only and are not kept (read refuses)
    terminal_ttl_ms: int = 0  # retention once ended; 0: the log's terminal_ttl_s
    interrupted_by: str = ""  # the run whose INTERRUPT or ROLLBACK asked to cancel this one
    rollback: bool = False  # its messages must not join its thread (ROLLBACK)
    until_idle: bool = False  # the run waits for its background tasks before it finishes
    # A live-only run keeps no events, so its record keeps the step and attempt
    # of its last one (a takeover names the attempt it supersedes); 0 otherwise.
    last_step: int = 0
    last_attempt: int = 0
    schedule_id: str = ""  # the schedule whose firing started the run; "" otherwise
    goal: str = ""  # the goal the run pursues (server/goals, JSON; opaque here); "" for none
    goal_progress: str = ""  # how far its judge got (server/goals; opaque here, set by append)
    # The trace context (W3C traceparent, JSON; opaque here) of the request that made the
    # run: every instance that executes it continues that trace (server/tracing.py).
    trace_context: str = ""
    tenant: str = ""  # the tenant of the caller that made it ("" without authentication)
    # Which incarnation of the store wrote which stretch of the log (events/lineage.py),
    # kept by the Redis log's appends; "" on the memory log, which never goes back.
    lineage: str = ""


class BusyPolicy(enum.StrEnum):
    """What a run sent to a thread does when the thread already has an active run."""

    REJECT = "reject"  # refuse it (ThreadBusy)
    ENQUEUE = "enqueue"  # wait in the thread's queue (FIFO)
    INTERRUPT = "interrupt"  # wait in the queue, and cancel the active run (its messages stay)
    ROLLBACK = "rollback"  # wait in the queue, and cancel the active run (its messages are dropped)


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    """A thread as the log stores it; the last three fields are read, never written."""

    thread_id: str
    resource_id: str
    metadata: dict[str, str]
    request_id: str
    create_time_ms: int
    update_time_ms: int
    owner: str = ""  # the tenant that owns the thread ("" without authentication)
    active_run_id: str = ""  # the run the thread belongs to now; "" when idle
    queued_run_ids: tuple[str, ...] = ()  # runs waiting for their turn, first to start first
    message_count: int = 0  # messages in the thread's history


@dataclass(frozen=True, slots=True)
class ThreadRunStart:
    """What start_thread_run did."""

    run: RunRecord  # the new run (or the existing one with its run_id)
    created: bool  # False: a run with this run_id existed (request_id idempotency)
    interrupted_run_id: str = ""  # the active run asked to cancel (INTERRUPT, ROLLBACK)


@dataclass(frozen=True, slots=True)
class ThreadPageCursor:
    """Where a page of list_threads ends: ordered by (create_time_ms, thread_id), newest first."""

    create_time_ms: int
    thread_id: str


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


class ControlListener(Protocol):
    """Receives requests addressed to a run's owner (called on the event loop, must not block)."""

    def on_cancel(self, reason: str) -> None:
        """CancelRun asked, through any instance, to stop the run."""


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
        run ids derive from request ids). A created run is owned by
        `record.owner` at `record.epoch` with a fresh lease (lease_ttl_s of the
        log) and is listed by `claimable` once that lease lapses.
        """

    async def get_run(self, run_id: str) -> RunRecord:
        """The run's record. Raises RunNotFound."""

    async def head(self, run_id: str) -> int:
        """The run's next index (cheap: no checkpoint is read). Raises RunNotFound."""

    async def history(self, run_id: str) -> tuple[int, str]:
        """The run's next index and its lineage (cheap: no checkpoint is read). Raises
        RunNotFound."""

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
        """Up to `limit` (> 0) runs, newest first, strictly after `after`, filtered.

        An empty `agent_id`, `states`, `thread_id` or `schedule_id`, and a None
        `tenant`, do not filter. Runs
        whose retention time passed are not listed. The records carry no
        checkpoint (b""), so a page stays small; get_run has it.
        """

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
        """Append events atomically and return the run's new next index.

        1. Check `epoch` equals the run's epoch, else raise StaleEpoch.
        2. Check events[0].index equals the run's next index, else raise
           IndexConflict (indices within `events` must be consecutive).
        3. Store the events, advance next_index, store `checkpoint` and
           `goal_progress` if given,
           and if `state` is given move the run to it (recording `error`); a
           terminal state starts the run's retention TTL. A state that is not
           runnable (suspended, terminal) drops the lease, so a run that
           becomes runnable again (Resume) is claimable at once; a runnable
           one lists the run for `claimable` again.
        4. Trim to the configured retention of events per run, if any,
           advancing earliest_index. A live_only run keeps no events at all,
           only the step and attempt of the last one (last_step, last_attempt).
        5. A terminal state of a run on a thread: if the run is the thread's
           active run, add `thread_messages` to the thread's history (unless
           the run was rolled back) and make the first run of the thread's
           queue its active run (QUEUED, ownerless: claimable at once), or
           leave the thread idle; if the run was still queued, take it out
           of the queue.
        6. Only then notify listeners.
        `events` may be empty to change only the state; listeners are then
        not notified. An exact replay of an already committed batch (a retry
        after a lost reply) writes nothing and returns the next index, as long
        as the log still retains the whole batch: a replay of a batch that
        retention (retain_events) has partly trimmed is an IndexConflict, like
        any append that does not start at the head.
        Raises RunNotFound; ValueError if the indices are not consecutive.
        """

    async def read(self, run_id: str, offset: int, limit: int) -> list[AgentEvent]:
        """Up to `limit` events with index >= offset, in order.

        Raises OffsetExpired when offset < the run's earliest_index, RunNotFound
        for an unknown run, RunNotResumable for a live_only run and an offset
        below its head. An offset at or past the head returns [].
        """

    async def subscribe(self, run_id: str, listener: Listener) -> Subscription:
        """Register `listener` for the run's notifications.

        When this returns, every event committed afterwards will reach the
        listener (or the listener gets on_gap), so a reader that subscribes
        first and reads the log second misses nothing.
        """

    # Ownership: leases and fencing (docs/durability.md). The lease lives beside
    # the run's record and expires by itself (lease_ttl_s of the log); the
    # epoch is the fencing token every write of the owner carries.

    async def claim(self, run_id: str, owner: str, *, force: bool = False) -> RunRecord | None:
        """Take over a QUEUED or RUNNING run whose lease lapsed, atomically.

        On success: epoch + 1, owner = `owner`, a fresh lease; returns the new
        record (with its checkpoint and cancel_reason). Returns None when the
        lease is still held, or the run is not runnable (ended, suspended,
        enqueued) or unknown. Two claimers: one wins. With `force`, a held
        lease does not stop the claim: the holder is fenced out (a workflow
        engine, not the lease, decides who executes the run).
        """

    async def renew(self, run_id: str, epoch: int) -> bool:
        """Extend (or retake, if it lapsed and nobody claimed) the lease at `epoch`.

        False when the run's epoch moved on (the caller was fenced out and
        must stop), the run is no longer runnable (ended, suspended) or it
        vanished.
        """

    async def release(self, run_id: str, epoch: int) -> None:
        """Drop the lease held at `epoch` (no-op otherwise), so any instance may claim at once."""

    async def claimable(self, limit: int, *, agent_ids: frozenset[str] | None = None) -> list[str]:
        """Up to `limit` (> 0) ids of QUEUED or RUNNING runs whose lease lapsed (for claim).

        With `agent_ids`, only runs of those agents: an instance claims only
        what it can execute, and a fleet's other agents never crowd its page.
        """

    # The tool journal: a finished tool's result, recorded before the step's
    # checkpoint, so a re-run step never calls a finished tool again.

    async def journal_tool(self, run_id: str, epoch: int, tool_call_id: str, result: bytes) -> None:
        """Record a tool call's result; first write wins (a later one is ignored).

        Raises StaleEpoch for a fenced writer, RunNotFound. The journal lives
        and expires with the run.
        """

    async def journaled_tool(self, run_id: str, tool_call_id: str) -> bytes | None:
        """The recorded result of a tool call, or None."""

    # Human in the loop: Resume's decisions on a suspended run.

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
        """Store decisions on a SUSPENDED run: a compare-and-set on its epoch.

        If the run is SUSPENDED at `expected_epoch`: replace its decisions with
        `decisions`, remember `request_record` under `request_id` (if given),
        and bump the epoch (so a racing Resume that read the same run fails).
        With `resume`, the run also becomes QUEUED, owned by `owner` at the new
        epoch with a fresh lease: runnable again, and claimable if that owner
        dies before it goes on. Returns the new record. Raises RunNotFound;
        ConcurrentModification when the run is no longer SUSPENDED at
        `expected_epoch`.
        """

    async def resume_request(self, run_id: str, request_id: str) -> bytes | None:
        """What `decide` remembered under `request_id` for this run, or None."""

    # Cancellation across instances.

    async def request_cancel(self, run_id: str, reason: str) -> RunRecord:
        """Store a cancel request with a live run (the first reason wins) and notify its owner.

        The request is durable: an owner that subscribes (or takes the run
        over) later still sees it in `RunRecord.cancel_reason`. A run that
        nobody executes (SUSPENDED, ENQUEUED) becomes QUEUED, so that some
        instance claims it and writes its abort. No-op on an ended run. Every
        call on a run not ended notifies again, with the stored (first)
        reason. Returns the record. Raises RunNotFound; ValueError for an
        empty reason (an empty cancel_reason means none).
        """

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> Subscription:
        """Register `listener` for requests addressed to the run's owner (cancel).

        When this returns, every later request reaches the listener. A
        notification lost on the way (a pub/sub reconnect) is not reported:
        the durable `cancel_reason` is the record, so an owner also checks it
        (claim returns it) after subscribing.
        """

    # Threads: conversations whose runs share a message history (server/threads).

    async def create_thread(self, record: ThreadRecord) -> tuple[ThreadRecord, bool]:
        """Store a new, idle thread unless one with this thread_id exists.

        Returns the stored record and whether this call created it.
        """

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        """The thread, with its active run, queue and message count. Raises ThreadNotFound."""

    async def list_threads(
        self,
        *,
        resource_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: ThreadPageCursor | None = None,
    ) -> list[ThreadRecord]:
        """Up to `limit` (> 0) threads, newest first, strictly after `after`.

        With `resource_id`, only that resource's threads; with `tenant`, only
        threads that tenant owns. Deleted and expired
        threads are not listed.
        """

    async def delete_thread(self, thread_id: str) -> None:
        """Delete an idle thread and its history.

        Raises ThreadNotFound; ThreadBusy while it has an active or queued run.
        """

    async def thread_messages(self, thread_id: str, start: int, stop: int) -> list[bytes]:
        """The thread's history entries with position in [start, stop), oldest first.

        Raises ThreadNotFound. Positions past the end are simply absent.
        """

    async def start_thread_run(self, record: RunRecord, policy: BusyPolicy) -> ThreadRunStart:
        """Create `record` (a QUEUED run with a thread_id) on its thread, atomically.

        1. A run with record.run_id exists: return it (created False).
        2. The thread is idle: the run becomes its active run, QUEUED and
           owned by record.owner with a fresh lease (as create_run).
        3. Busy and REJECT: raise ThreadBusy, storing nothing.
        4. Busy otherwise: the run is stored ENQUEUED (no owner) at the end of
           the thread's queue; INTERRUPT and ROLLBACK also store a cancel
           request (interrupted_by = the new run, and for ROLLBACK rollback)
           with the active run, as request_cancel would, and name it in the
           result.
        Raises ThreadNotFound.
        """

    # Counters: how the scripted agent's `record` tool proves exactly-once effects.

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int:
        """Increment the run's counter `key` and return its new value (for test tools).

        With `once_key` (an idempotency key), only the first call with that key
        increments; later calls return the current value unchanged.
        """

    async def get_counter(self, run_id: str, key: str) -> int:
        """The run's counter `key`, 0 if never incremented."""

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections and background tasks; safe to call more than once."""
