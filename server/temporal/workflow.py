"""The workflow of one Keel run (deterministic code: Temporal replays it).

The run's work happens in one activity, `keel.execute_run` (server/temporal/
activities.py): it takes the run over at a new epoch and executes it, from
its last checkpoint, until it ends or suspends, writing every event to
Keel's event log as it goes. The workflow only sequences those attempts:

1. Execute the activity. If it fails (its worker died and stopped
   heartbeating, or the store was unreachable), Temporal retries it, on any
   worker; the retry fences the earlier attempt out and resumes from the
   checkpoint, with step_superseded for a step the earlier one left half
   done.
2. The run ended: the workflow returns its state.
3. The run suspended (a tool call waits for a human) or waits for its
   thread: the workflow waits, durably and without a worker busy, for a
   wake-up: the `resume` Update (Resume, once every interrupt is answered)
   or the `wake` signal (the thread's previous run ended, a cancel request,
   or a server's sweep); then back to 1. A spurious wake-up costs one short
   activity that finds the run still waiting.
4. Cancelled (CancelRun): the run's record holds the cancel request, so one
   more attempt writes `abort` and CANCELLED; then the workflow ends
   cancelled.

History stays small whatever the run's length: events live in the event
log, not in the workflow's history, which holds a few entries per attempt;
a run suspended and resumed many times continues as new when Temporal
suggests it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

WORKFLOW = "KeelRun"
EXECUTE_RUN = "keel.execute_run"
WAKE = "wake"
RESUME = "resume"
_ENDED = frozenset({"succeeded", "failed", "cancelled"})


def workflow_id(run_id: str) -> str:
    """The workflow of a run: its id derives from the run id, which derives from the
    request_id when there is one, so a repeated request reaches the same workflow."""
    return f"keel-run-{run_id}"


@dataclass
class RunInput:
    run_id: str
    heartbeat_timeout_s: float = 10.0


@dataclass
class Outcome:
    """Where an attempt left the run: its state, and its pending interrupts' tool call ids."""

    state: str
    interrupts: list[str] = field(default_factory=list)


@workflow.defn(name=WORKFLOW)
class RunWorkflow:
    def __init__(self) -> None:
        self._wakes = 0
        self._seen = 0  # wake-ups sent before the latest attempt began
        self._pending: list[str] | None = None  # the interrupts, while suspended
        self._ended = False

    @workflow.run
    async def run(self, given: RunInput) -> str:
        try:
            while True:
                self._seen = self._wakes
                outcome = await self._attempt(given)
                if outcome.state in _ENDED:
                    self._ended = True
                    return outcome.state
                # Suspended or enqueued: wait for a wake-up sent since the attempt began.
                self._pending = outcome.interrupts if outcome.state == "suspended" else None
                await workflow.wait_condition(lambda: self._wakes > self._seen)
                self._pending = None
                if workflow.info().is_continue_as_new_suggested():
                    workflow.continue_as_new(given)
        except asyncio.CancelledError:
            # CancelRun stored its request with the run: this attempt writes the abort.
            await self._attempt(given)
            self._ended = True
            raise

    @workflow.signal(name=WAKE)
    def wake(self) -> None:
        self._wakes += 1

    @workflow.update(name=RESUME)
    async def resume(self, tool_call_ids: list[str]) -> None:
        """Every interrupt of the suspended run is answered (the decisions are stored
        with the run): go on with it."""
        self._wakes += 1

    @resume.validator
    def _check_resume(self, tool_call_ids: list[str]) -> None:
        if self._ended:
            raise ValueError("the run has ended")
        if self._pending is not None:
            unknown = sorted(set(tool_call_ids) - set(self._pending))
            if unknown:
                raise ValueError(f"no pending interrupt with tool_call_id {', '.join(unknown)}")

    async def _attempt(self, given: RunInput) -> Outcome:
        outcome: Outcome = await workflow.execute_activity(
            EXECUTE_RUN,
            given.run_id,
            result_type=Outcome,
            # A run may take as long as it takes; a dead worker is found by its heartbeats.
            start_to_close_timeout=timedelta(days=365),
            heartbeat_timeout=timedelta(seconds=given.heartbeat_timeout_s),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=200),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=10),
                non_retryable_error_types=["RunNotFound"],
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        return outcome
