"""The workflow of one Keel run (deterministic code: Temporal replays it).

The run's work happens in activities (server/temporal/activities.py), one
per half-step: `keel.model_request` (the next model request, streamed into
Keel's event log) and `keel.tool_calls` (the tool calls of its response).
Each takes the run over at a new epoch and goes on from its last
checkpoint, so the workflow only sequences them:

1. Execute the half-step the run is at. If the activity fails (its worker
   died and stopped heartbeating, or the store was unreachable), Temporal
   retries it, on any worker; the retry fences the earlier attempt out and
   goes on from the checkpoint, with step_superseded for a half-step the
   earlier one left unfinished.
2. At a boundary: execute the next half-step.
3. The run ended: the workflow returns its state.
4. The run suspended (a tool call waits for a human) or waits for its
   thread: the workflow waits, durably and without a worker busy, for a
   wake-up: the `resume` Update (Resume, once every interrupt is answered)
   or the `wake` signal (the thread's previous run ended, a cancel request,
   or a server's sweep); then back to 1. A spurious wake-up costs one short
   activity that finds the run still waiting.
5. Cancelled (CancelRun): the run's record holds the cancel request, so one
   more activity writes `abort` and CANCELLED; then the workflow ends
   cancelled.

History stays small for the length of a run: events live in the event log,
not in the workflow's history, which holds a few entries per half-step; the
workflow continues as new when Temporal suggests it, between half-steps or
while waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

WORKFLOW = "KeelRun"
MODEL_REQUEST = "keel.model_request"
TOOL_CALLS = "keel.tool_calls"
WAKE = "wake"
RESUME = "resume"
RUNNING = "running"  # an activity stopped at a half-step boundary
_ENDED = frozenset({"succeeded", "failed", "cancelled"})


def workflow_id(run_id: str) -> str:
    """The workflow of a run: its id derives from the run id, which derives from the
    request_id when there is one, so a repeated request reaches the same workflow."""
    return f"keel-run-{run_id}"


@dataclass
class RunInput:
    run_id: str
    heartbeat_timeout_s: float = 10.0
    activity: str = MODEL_REQUEST  # the half-step the run is at


@dataclass
class Outcome:
    """Where an activity left the run: its state; at a boundary (RUNNING), the
    activity of the next half-step; when suspended, its pending tool call ids."""

    state: str
    interrupts: list[str] = field(default_factory=list)
    next: str = ""


@workflow.defn(name=WORKFLOW)
class RunWorkflow:
    def __init__(self) -> None:
        self._wakes = 0
        self._seen = 0  # wake-ups sent before the latest activity began
        self._pending: list[str] | None = None  # the interrupts, while suspended
        self._ended = False

    @workflow.run
    async def run(self, given: RunInput) -> str:
        activity = given.activity
        try:
            while True:
                self._seen = self._wakes
                outcome = await self._half_step(given, activity)
                if outcome.state in _ENDED:
                    self._ended = True
                    return outcome.state
                if outcome.state == RUNNING:
                    activity = outcome.next
                else:
                    # Suspended or enqueued: wait for a wake-up sent since the activity began.
                    suspended = outcome.state == "suspended"
                    self._pending = outcome.interrupts if suspended else None
                    await workflow.wait_condition(lambda: self._wakes > self._seen)
                    self._pending = None
                    activity = TOOL_CALLS if suspended else MODEL_REQUEST
                if workflow.info().is_continue_as_new_suggested():
                    workflow.continue_as_new(replace(given, activity=activity))
        except asyncio.CancelledError:
            # CancelRun stored its request with the run: this activity writes the abort.
            await self._half_step(given, activity)
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

    async def _half_step(self, given: RunInput, activity: str) -> Outcome:
        outcome: Outcome = await workflow.execute_activity(
            activity,
            given.run_id,
            result_type=Outcome,
            # A model request or a tool may take long; a dead worker is found by heartbeats.
            start_to_close_timeout=timedelta(days=1),
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
