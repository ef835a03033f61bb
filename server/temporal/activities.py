"""The activities of a run's workflow: the run's model requests and tool calls, on this worker.

`keel.model_request(run_id)` executes the run's next model request (the
step's first half: events streamed to the log as the model makes them, then
the RESPONSE checkpoint); `keel.tool_calls(run_id)` executes the tool calls
of that response (the second half, through the tool journal, then the STEP
checkpoint). Both are the same thing underneath: claim the run at a new
epoch (whoever held it: Temporal, not a lease, decides that this worker
executes it now; the earlier writer, alive or not, is fenced out), run
Keel's supervisor from the run's checkpoint exactly as the local executor
does, and stop at the next half-step boundary. So the sequence rules are
the same with either executor: a half-step left unfinished commits
step_superseded first and runs again as attempt + 1; a tool call the
journal holds is not run again; every event goes to the event log as it is
made. A response without tool calls goes straight on to the run's end (its
goal's judgment, its wait for background tasks) in the same activity.

An activity heartbeats while it works; a worker that dies stops
heartbeating, and Temporal retries the activity on another worker. It
returns where the run stands: at a boundary (and which half comes next),
ended, suspended, or waiting for its thread; a run that stopped short (the
store was unreachable) fails the attempt, and Temporal retries it with
backoff. Cancelled by the workflow (CancelRun), it has the run write its
abort; cancelled for any other reason (worker shutdown, a heartbeat
timeout) it stops without writing, and the next attempt takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from temporalio import activity
from temporalio.exceptions import ApplicationError

from server import metrics
from server.agents.checkpoint import Checkpoint, Phase
from server.errors import RunNotFound, StoreUnavailable
from server.events.log import EventLog, RunState
from server.runs.executor import LocalExecutor
from server.runs.supervisor import RunTask, Stop
from server.temporal.workflow import MODEL_REQUEST, RUNNING, TOOL_CALLS, Outcome

log = logging.getLogger(__name__)


class RunActivities:
    """The activities of a worker: they execute runs with this worker's LocalExecutor
    (opened without its sweeper: runs come from Temporal)."""

    def __init__(
        self,
        executor: LocalExecutor,
        event_log: EventLog,
        *,
        heartbeat_interval_s: float,
        half_steps: bool = True,
    ) -> None:
        """Without `half_steps`, an activity runs the run on until it ends or waits
        (suspended, or in its thread's queue) instead of stopping at each boundary."""
        self._executor = executor
        self._log = event_log
        self._heartbeat_interval_s = heartbeat_interval_s
        self._half_steps = half_steps

    @activity.defn(name=MODEL_REQUEST)
    async def model_request(self, run_id: str) -> Outcome:
        """The run's next model request (with its start or resumption before it)."""
        return await self._half_step(run_id)

    @activity.defn(name=TOOL_CALLS)
    async def tool_calls(self, run_id: str) -> Outcome:
        """The tool calls of the run's last model response."""
        return await self._half_step(run_id)

    async def _half_step(self, run_id: str) -> Outcome:
        """Execute the run from its checkpoint to the next half-step boundary (or its
        end, suspension, or wait for its thread); say where it stands."""
        while True:
            try:
                record = await self._log.get_run(run_id)
            except RunNotFound as exc:
                raise ApplicationError(str(exc), type="RunNotFound", non_retryable=True) from exc
            if record.state.terminal:
                return Outcome(record.state.value)
            if record.state is RunState.SUSPENDED:
                interrupts = Checkpoint.decode(record.checkpoint).interrupts
                return Outcome(record.state.value, [i["tool_call_id"] for i in interrupts])
            if record.state is RunState.ENQUEUED:
                return Outcome(record.state.value)
            if activity.info().attempt > 1:
                metrics.TAKEOVERS.inc()  # Temporal retried it: the run is taken over
            task = await self._executor.execute(run_id, half_step=self._half_steps)
            if task is None:
                continue  # it stopped being runnable meanwhile: look again
            await self._follow(run_id, task)
            boundary = task.result()
            if boundary is not None:
                following = TOOL_CALLS if boundary is Phase.RESPONSE else MODEL_REQUEST
                return Outcome(RUNNING, next=following)
            if (await self._log.get_run(run_id)).state.runnable:
                raise ApplicationError("the run stopped before its end; another attempt resumes it")

    async def _follow(self, run_id: str, task: RunTask) -> None:
        """Heartbeat until the run's task is done; on cancellation, stop it as fits."""
        try:
            while not task.done():
                activity.heartbeat()
                await asyncio.wait({task}, timeout=self._heartbeat_interval_s)
        except asyncio.CancelledError:
            self._executor.stop_run(run_id, await self._why_cancelled(run_id))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
            raise

    async def _why_cancelled(self, run_id: str) -> Stop:
        details = activity.cancellation_details()
        if details is not None and details.cancel_requested:
            try:
                if (await self._log.get_run(run_id)).cancel_reason:
                    return Stop.CANCEL
            except StoreUnavailable:
                pass
        return Stop.SHUTDOWN
