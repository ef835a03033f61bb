"""The activity of a run's workflow: take the run over and execute it, on this worker.

`keel.execute_run(run_id)` is one attempt at a run. It claims the run at a
new epoch (whoever held it: Temporal, not a lease, decides that this worker
executes it now; the earlier writer, alive or not, is fenced out) and runs
Keel's supervisor on it exactly as the local executor does, so the sequence
rules are the same with either executor: the run resumes from its last
checkpoint; a step left half done commits step_superseded first and runs
again as attempt + 1; a tool call the journal holds is not run again;
every event goes to the event log as it is made.

It heartbeats while the run executes; a worker that dies stops
heartbeating, and Temporal retries the activity on another worker. It
returns when the run ended, suspended, or waits for its thread; a run that
stopped short (the store was unreachable) fails the attempt, and Temporal
retries it with backoff. Cancelled by the workflow (CancelRun), it has the
run write its abort; cancelled for any other reason (worker shutdown, a
heartbeat timeout) it stops without writing, and the next attempt takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from temporalio import activity
from temporalio.exceptions import ApplicationError

from server.agents.checkpoint import Checkpoint
from server.errors import RunNotFound, StoreUnavailable
from server.events.log import EventLog, RunState
from server.runs.executor import LocalExecutor
from server.runs.supervisor import Stop
from server.temporal.workflow import EXECUTE_RUN, Outcome

log = logging.getLogger(__name__)


class RunActivities:
    """The activities of a worker: they execute runs with this worker's LocalExecutor
    (opened without its sweeper: runs come from Temporal)."""

    def __init__(self, executor: LocalExecutor, event_log: EventLog, heartbeat_interval_s: float):
        self._executor = executor
        self._log = event_log
        self._heartbeat_interval_s = heartbeat_interval_s

    @activity.defn(name=EXECUTE_RUN)
    async def execute_run(self, run_id: str) -> Outcome:
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
            task = await self._executor.execute(run_id)
            if task is None:
                continue  # it stopped being runnable meanwhile: look again
            log.info("run %s: executing it (activity attempt %d)", run_id, activity.info().attempt)
            await self._follow(run_id, task)
            if (await self._log.get_run(run_id)).state.runnable:
                raise ApplicationError("the run stopped before its end; another attempt resumes it")

    async def _follow(self, run_id: str, task: asyncio.Task[None]) -> None:
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
