"""A state machine of a run's lifecycle against both EventLogs, with a model of what it must be.

A run is created (start: twice, as a retried request would) and then driven
by rules in any order an instance, a human and a failing owner could
produce: its owner works (events and a checkpoint), suspends, finishes or
fails it, and aborts it once a cancel was requested; Resume decides on a
suspended run (a compare-and-set on the epoch, resuming or not, sometimes
with a stale epoch, sometimes two Resumes at once: one wins) or commits a
resumed event; CancelRun asks to stop it; other instances take it over
(claim, forced, or after the lease lapsed or was released); the owner
renews and releases its lease; owners fenced out try to write, journal,
renew and release; time lapses (leases run out, ended runs expire). Once a
run has ended the next one may start on the same log (up to MAX_RUNS).

After every step the log must agree with the model, for every run: the
record (state, epoch, owner, next index, checkpoint, cancel reason,
decisions), the events, whether the run is claimable, and the notifications
a listener subscribed before the run existed got so far (a prefix of the
events, in order, no duplicates). At the end each listener must have been
told every event of its run.

On Redis, leases and retention are tiny (harness.Timing): a held lease may
have lapsed and an ended run expired at any moment, so there the model
accepts either outcome (and learns which), never asserting on time.

Examples: 200 machines of 30 steps on memory, 60 on Redis, derandomized (the
same ones on every run). KEEL_PROPERTY_EXAMPLES=500 (or any count) runs that
many per backend, random; a failure prints the steps that reproduce it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from keel.v1.agent_service_pb2 import AgentEvent, RunResumed

from server.errors import ConcurrentModification, RunNotFound, StaleEpoch
from server.events.log import EventLog, RunRecord, RunState, Subscription
from tests.property.harness import (
    EXAMPLE_TIMEOUT_S,
    Clock,
    Expiry,
    Timing,
    ending_event,
    new_run_id,
    open_log,
    property_settings,
    redis_url_for,
    text_events,
    timeout_for,
    wait_for,
    wire,
)

CI_EXAMPLES = {"memory": 200, "redis": 60}
STEPS = 30
MAX_LAPSES = 2  # Clock.advance waits on Redis
MAX_RUNS = 4

T = TypeVar("T")


async def gather(calls: list[Coroutine[Any, Any, T]]) -> list[T | BaseException]:
    return await asyncio.gather(*calls, return_exceptions=True)


class Lease(enum.Enum):
    HELD = "held"  # by the owner at the run's epoch (on Redis it may have lapsed since)
    FREE = "free"  # released, lapsed, or dropped by a state that is not runnable


class Recorder:
    """A Listener that keeps every notified event."""

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []
        self.gaps = 0

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        self.events.extend(events)

    def on_gap(self) -> None:
        self.gaps += 1


@dataclass
class RunModel:
    """What a run must be, and a listener subscribed to it before it existed."""

    run_id: str = field(default_factory=new_run_id)
    state: RunState = RunState.QUEUED
    epoch: int = 1
    owner: str = "owner-0"
    events: list[AgentEvent] = field(default_factory=list)
    checkpoint: bytes = b""
    cancel_reason: str = ""
    decisions: bytes = b""
    lease: Lease = Lease.HELD
    fenced: list[int] = field(default_factory=list)  # epochs taken over (or outbid by Resume)
    expiry: Expiry = Expiry.NO
    recorder: Recorder = field(default_factory=Recorder)
    subscription: Subscription | None = None

    @property
    def next(self) -> int:
        return len(self.events)

    def gone(self, error: RunNotFound) -> None:
        assert self.expiry is not Expiry.NO, f"{self.run_id} vanished while {self.state}: {error}"
        self.expiry = Expiry.YES

    def check(self, record: RunRecord, what: str) -> None:
        expected = (self.state, self.epoch, self.owner, self.next, self.cancel_reason)
        actual = (record.state, record.epoch, record.owner, record.next_index, record.cancel_reason)
        assert actual == expected, f"{what}: {actual} != {expected} (state, epoch, owner, ...)"
        assert record.decisions == self.decisions, f"{what}: decisions"


class RunLifecycle(RuleBasedStateMachine):
    """Runs, one at a time, on a fresh log: the rules act on the newest (`run`), whose
    predecessors have ended; every invariant covers them all."""

    def __init__(self, backend: str, redis_url: str) -> None:
        super().__init__()
        self.backend = backend
        self.timing = Timing.of(backend)
        self.loop = asyncio.new_event_loop()
        self.clock = Clock(jumps=backend == "memory")
        self.log: EventLog = self.wait(open_log(backend, redis_url, self.clock))
        self.runs: list[RunModel] = []
        self.owners = 0
        self.lapses = 0
        self.decisions_made = 0

    @property
    def run(self) -> RunModel:
        return self.runs[-1]

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the machine's loop (failing it if it hangs)."""

        async def bounded() -> T:
            async with asyncio.timeout(EXAMPLE_TIMEOUT_S):
                return await coroutine

        return self.loop.run_until_complete(bounded())

    def teardown(self) -> None:
        try:
            self.wait(self._all_notified())
        finally:
            try:
                for run in self.runs:
                    if run.subscription is not None:
                        self.wait(run.subscription.close())
                self.wait(self.log.close())
            finally:
                self.loop.close()

    async def _all_notified(self) -> None:
        for run in self.runs:
            if run.recorder.gaps:
                continue  # the pub/sub connection dropped: a listener would re-read the log
            told = run.recorder.events
            await wait_for(lambda run=run: len(run.recorder.events) >= run.next, "notifications")
            assert wire(told) == wire(run.events), f"{run.run_id}: notified other events"

    # --- helpers -------------------------------------------------------------------

    def _owner_appends(
        self, events: list[AgentEvent], state: RunState, checkpoint: bytes | None = None
    ) -> None:
        """The owner at the run's epoch commits `events` and moves the run to `state`."""
        run = self.run
        head = self.wait(
            self.log.append(run.run_id, run.epoch, events, state=state, checkpoint=checkpoint)
        )
        assert head == run.next + len(events)
        run.events.extend(events)
        if checkpoint is not None:
            run.checkpoint = checkpoint
        run.state = state
        if not state.runnable:
            run.lease = Lease.FREE  # nobody executes a suspended or ended run
        if state.terminal:
            run.expiry = Expiry.MAYBE if self.backend == "redis" else Expiry.NO

    def _owner(self) -> str:
        self.owners += 1
        return f"owner-{self.owners}"

    # --- rules ---------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self._start()

    @precondition(lambda self: self.run.state.terminal and len(self.runs) < MAX_RUNS)
    @rule()
    def start_next(self) -> None:
        self._start()

    def _start(self) -> None:
        """Subscribe (before the run exists: allowed), create the run, create it again."""
        run = RunModel()
        run.subscription = self.wait(self.log.subscribe(run.run_id, run.recorder))
        self.runs.append(run)
        record = RunRecord(
            run_id=run.run_id,
            agent_id="echo",
            input="hello",
            request_id=f"req-{run.run_id}",
            state=RunState.QUEUED,
            create_time_ms=1_000,
            update_time_ms=1_000,
            owner=run.owner,
        )
        stored, created = self.wait(self.log.create_run(record))
        assert created and stored == record
        again, created_again = self.wait(self.log.create_run(record))  # a retried request
        assert not created_again and again == record

    @precondition(lambda self: self.run.state.runnable)
    @rule(count=st.integers(1, 3))
    def work(self, count: int) -> None:
        run = self.run
        events = text_events(run.run_id, run.next, count, f"epoch{run.epoch}")
        self._owner_appends(events, RunState.RUNNING, checkpoint=f"cp{run.next}".encode())

    @precondition(lambda self: self.run.state.runnable)
    @rule()
    def suspend(self) -> None:
        suspended = ending_event(self.run.run_id, self.run.next, RunState.SUSPENDED)
        self._owner_appends([suspended], RunState.SUSPENDED)

    @precondition(lambda self: self.run.state.runnable)
    @rule(failed=st.booleans())
    def finish(self, failed: bool) -> None:
        state = RunState.FAILED if failed else RunState.SUCCEEDED
        self._owner_appends([ending_event(self.run.run_id, self.run.next, state)], state)

    @precondition(lambda self: self.run.state.runnable and bool(self.run.cancel_reason))
    @rule()
    def abort(self) -> None:
        """The owner sees the cancel request and ends the run."""
        event("abort after a cancel request")
        aborted = ending_event(self.run.run_id, self.run.next, RunState.CANCELLED)
        self._owner_appends([aborted], RunState.CANCELLED)

    @rule(resume=st.booleans(), stale=st.booleans(), racers=st.integers(1, 2))
    def decide(self, resume: bool, stale: bool, racers: int) -> None:
        """Resume's decisions: a compare-and-set on the epoch the caller read; of
        `racers` Resumes that read the same run, one wins."""
        run = self.run
        tries = []
        for _ in range(racers):
            self.decisions_made += 1
            decisions = f'{{"n":{self.decisions_made}}}'.encode()
            tries.append((decisions, f"resume-{self.decisions_made}", self._owner()))
        calls = [
            self.log.decide(
                run.run_id,
                expected_epoch=run.epoch - 1 if stale else run.epoch,
                decisions=decisions,
                owner=owner,
                resume=resume,
                request_id=request_id,
                request_record=decisions,
            )
            for decisions, request_id, owner in tries
        ]
        outcomes = self.wait(gather(calls))
        won = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, RunRecord)]
        for outcome in outcomes:
            if isinstance(outcome, RunNotFound):
                run.gone(outcome)
                return
            assert isinstance(outcome, RunRecord | ConcurrentModification), repr(outcome)
        if stale or run.state is not RunState.SUSPENDED:
            assert won == [], f"decide on a {run.state} run (stale: {stale}) went in"
            return
        assert len(won) == 1, f"{len(won)} of {racers} Resumes of one epoch went in"
        event(f"decide (resume={resume}, {racers} racing)")
        winner, record = won[0]
        decisions, request_id, owner = tries[winner]
        run.fenced.append(run.epoch)
        run.epoch += 1
        run.decisions = decisions
        if resume:
            run.state = RunState.QUEUED
            run.owner = owner
            run.lease = Lease.HELD
        run.check(record, "decide's record")
        for i, (decisions, request_id, _) in enumerate(tries):
            remembered = self.wait(self.log.resume_request(run.run_id, request_id))
            assert remembered == (decisions if i == winner else None)

    @precondition(lambda self: self.run.state is RunState.SUSPENDED)
    @rule()
    def resume_by_append(self) -> None:
        """A Resume commits its event at the run's epoch: runnable, claimable at once."""
        run = self.run
        resumed = AgentEvent(
            run_id=run.run_id, index=run.next, step=1, attempt=1, resumed=RunResumed()
        )
        self._owner_appends([resumed], RunState.QUEUED)

    @rule(reason=st.sampled_from(["stop", "no longer wanted"]))
    def cancel(self, reason: str) -> None:
        run = self.run
        try:
            record = self.wait(self.log.request_cancel(run.run_id, reason))
        except RunNotFound as error:
            run.gone(error)
            return
        assert run.expiry is not Expiry.YES, "an expired run took a cancel request"
        if not run.state.terminal:
            run.cancel_reason = run.cancel_reason or reason  # the first reason wins
            if run.state is RunState.SUSPENDED:
                event("cancel of a suspended run")
                run.state = RunState.QUEUED  # some instance must claim it and abort it
        run.check(record, "request_cancel's record")

    @rule(force=st.booleans())
    def takeover(self, force: bool) -> None:
        run = self.run
        owner = self._owner()
        claimed = self.wait(self.log.claim(run.run_id, owner, force=force))
        if not run.state.runnable or run.expiry is not Expiry.NO:
            assert claimed is None, f"a {run.state} run was claimed"
            return
        if force or run.lease is Lease.FREE:
            assert claimed is not None, f"claim(force={force}) of a claimable run failed"
        elif self.backend == "memory":
            assert claimed is None, "a held lease was taken without force"
        if claimed is None:
            return  # on Redis, the lease may or may not have lapsed by now
        event(f"takeover (force={force}, lease {run.lease.value})")
        run.fenced.append(run.epoch)
        run.epoch += 1
        run.owner = owner
        run.lease = Lease.HELD
        run.check(claimed, "claim's record")
        assert claimed.checkpoint == run.checkpoint, "the new owner must resume from here"

    @rule()
    def renew(self) -> None:
        run = self.run
        renewed = self.wait(self.log.renew(run.run_id, run.epoch))
        assert renewed is (run.state.runnable and run.expiry is Expiry.NO)
        if renewed:
            run.lease = Lease.HELD  # retaken if it had lapsed: nobody claimed it meanwhile

    @rule()
    def release(self) -> None:
        self.wait(self.log.release(self.run.run_id, self.run.epoch))
        self.run.lease = Lease.FREE

    @precondition(lambda self: bool(self.run.fenced))
    @rule(which=st.integers(0, 5), end=st.booleans())
    def fenced_owner(self, which: int, end: bool) -> None:
        """An owner taken over goes on as if it still owned the run: refused everywhere."""
        run = self.run
        epoch = run.fenced[which % len(run.fenced)]
        events = text_events(run.run_id, run.next, 1, f"fenced{epoch}")
        state = RunState.SUCCEEDED if end else None
        try:
            self.wait(self.log.append(run.run_id, epoch, events, state=state))
            raise AssertionError(f"an owner fenced at epoch {epoch} wrote")
        except StaleEpoch as refused:
            assert (refused.epoch, refused.current_epoch) == (epoch, run.epoch)
        except RunNotFound as error:
            run.gone(error)
            return
        event("fenced owner refused")
        try:
            self.wait(self.log.journal_tool(run.run_id, epoch, "call-1", b"stale"))
            raise AssertionError(f"an owner fenced at epoch {epoch} journaled a tool")
        except StaleEpoch:
            pass
        except RunNotFound as error:
            run.gone(error)
            return
        assert not self.wait(self.log.renew(run.run_id, epoch))
        self.wait(self.log.release(run.run_id, epoch))  # a no-op: the lease is not its own

    @precondition(lambda self: self.lapses < MAX_LAPSES)
    @rule()
    def lapse(self) -> None:
        """Time passes: leases run out, ended runs expire."""
        self.lapses += 1
        self.wait(self.clock.advance(self.timing.lapse_s))
        for run in self.runs:
            run.lease = Lease.FREE
            if run.state.terminal:
                run.expiry = Expiry.YES

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def records_and_events_match(self) -> None:
        for run in self.runs:
            try:
                record = self.wait(self.log.get_run(run.run_id))
                stored = self.wait(self.log.read(run.run_id, 0, 1_000))
            except RunNotFound as error:
                run.gone(error)
                continue
            assert run.expiry is not Expiry.YES, f"{run.run_id} outlived its retention"
            run.check(record, "get_run")
            assert record.checkpoint == run.checkpoint
            assert wire(stored) == wire(run.events)

    @invariant()
    def claimable_when_runnable_without_a_lease(self) -> None:
        if not self.runs:
            return
        listed = set(self.wait(self.log.claimable(10)))
        for run in self.runs:
            free = run.state.runnable and run.lease is Lease.FREE and run.expiry is Expiry.NO
            if self.backend == "memory":
                assert (run.run_id in listed) is free, f"claimable: {run.state}, {run.lease}"
            else:
                assert run.run_id in listed or not free, "a runnable run without a lease is missed"
                assert run.run_id not in listed or run.state.runnable, f"a {run.state} run listed"

    @invariant()
    def notified_in_order(self) -> None:
        for run in self.runs:
            if run.recorder.gaps == 0:
                told = wire(run.recorder.events)
                assert told == wire(run.events[: len(told)]), "notifications out of order"


@pytest.mark.parametrize(
    "backend",
    [pytest.param(name, marks=timeout_for(count, 3.0)) for name, count in CI_EXAMPLES.items()],
)
def test_run_lifecycle_agrees_with_its_model(backend: str, request: pytest.FixtureRequest) -> None:
    redis_url = redis_url_for(backend, request)
    run_state_machine_as_test(
        lambda: RunLifecycle(backend, redis_url),
        settings=property_settings(CI_EXAMPLES[backend], stateful_step_count=STEPS),
    )
