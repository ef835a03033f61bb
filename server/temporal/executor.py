"""The Temporal executor (API side): runs are stored as with the local executor, and
executed by Temporal workflows on `python -m server worker` processes.

- start: store the run (server/runs/admission.py), then start its workflow,
  whose id derives from the run id (and so from the request_id): a repeated
  request attaches to the same workflow. A live-only run's workflow starts
  once its Stream listens (Started.launch), so its first events reach it.
- resume: store the decisions as the local executor does (same checks, same
  errors), then send the workflow the `resume` Update.
- cancel: store the cancel request (the worker executing the run hears it
  and aborts the run), cancel the workflow, and wait for the abort.
- A sweep (at start, then every sweep_interval_s) wakes the workflow of every
  runnable run that nobody holds a lease on: one whose workflow could not be
  started because Temporal was down, or a thread's next run after its
  predecessor ended while no worker could tell it.

Temporal being down fails start/resume/cancel with EngineUnavailable
(UNAVAILABLE + RetryInfo): the run is stored already, and a retry with the
same request_id, or the sweep once Temporal is back, starts its workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from server.agents.types import AgentSpec
from server.errors import EngineUnavailable, ServerDraining, StoreUnavailable
from server.events.log import BusyPolicy, EventLog, RunRecord, RunState
from server.goals.records import Goal
from server.runs import admission, decisions
from server.runs.executor import Resumed, Started, Timing
from server.tasks.records import TaskRecord
from server.tasks.store import TaskStore
from server.temporal.engine import Engine

log = logging.getLogger(__name__)

_SWEEP_BATCH = 100
_CANCEL_POLL_S = 0.05


def _nothing() -> None:
    """The launch of a run whose workflow is started already, or needs none yet."""


class TemporalExecutor:
    """Hands runs to Temporal; see the module docstring."""

    def __init__(
        self,
        log: EventLog,
        agents: Mapping[str, AgentSpec],
        engine: Engine,
        *,
        instance_id: str,
        task_store: TaskStore,
        timing: Timing | None = None,
    ) -> None:
        self._log = log
        self._agents = dict(agents)
        self._engine = engine
        self._instance_id = instance_id
        self._task_store = task_store
        self._timing = timing or Timing()
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        return self._agents

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def task_store(self) -> TaskStore:
        return self._task_store

    def agent(self, agent_id: str) -> AgentSpec:
        return admission.agent_of(self._agents, agent_id)

    def open(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="workflow-sweeper")

    async def start(
        self,
        agent_id: str,
        input: str,
        request_id: str = "",
        *,
        thread_id: str = "",
        policy: BusyPolicy = BusyPolicy.REJECT,
        until_idle: bool = False,
        goal: Goal | None = None,
        schedule_id: str = "",
        tenant: str = "",
    ) -> Started:
        if self._draining:
            raise ServerDraining()
        admitted = await admission.admit(
            self._log,
            self._agents,
            owner=self._instance_id,
            agent_id=agent_id,
            input=input,
            request_id=request_id,
            thread_id=thread_id,
            policy=policy,
            until_idle=until_idle,
            goal=goal,
            schedule_id=schedule_id,
            tenant=tenant,
        )
        if admitted.interrupted_run_id:
            # Its worker hears the stored request; a suspended one needs its workflow woken.
            await self._engine.wake(admitted.interrupted_run_id)
        record = admitted.run
        if record.state is RunState.ENQUEUED:
            return Started(record, _nothing, created=admitted.created)  # waits for its thread
        if record.live_only and admitted.created:
            return Started(record, self._launcher(record.run_id))
        if not record.state.terminal:
            # Also for a repeated request: the first one may have failed to start it.
            await self._engine.start(record.run_id)
        return Started(record, _nothing, created=admitted.created)

    async def resume(
        self, run_id: str, answers: Sequence[decisions.Decision], request_id: str = ""
    ) -> Resumed:
        if self._draining:
            raise ServerDraining()
        decided = await admission.decide(
            self._log,
            owner=self._instance_id,
            run_id=run_id,
            answers=answers,
            request_id=request_id,
        )
        if decided.resumed is not None:
            try:
                await self._engine.resume(run_id, [d.tool_call_id for d in answers])
            except EngineUnavailable as exc:
                # The decisions are stored: the sweep wakes the workflow once Temporal is back.
                log.warning("run %s resumed while Temporal is unreachable: %s", run_id, exc)
        return Resumed(decided.offset, _nothing)

    async def cancel(self, run_id: str, reason: str) -> RunRecord:
        """Store the request, cancel the workflow, and wait (cancel_wait_s at most) for the
        run to end; returns it as it is then."""
        reason = reason or "cancelled"
        record = await self._log.request_cancel(run_id, reason)
        if record.state.terminal:
            return record
        await self._engine.cancel(run_id)
        deadline = time.monotonic() + self._timing.cancel_wait_s
        while not record.state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL_S)
            record = await self._log.get_run(run_id)
        return record

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        """Stop a background task; the worker running it hears through the store."""
        task = await self._task_store.cancel_task(task_id, reason)
        deadline = time.monotonic() + self._timing.cancel_wait_s
        while not task.status.ended and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL_S)
            task = await self._task_store.get_task(task_id)
        return task

    async def retry_task(self, task_id: str) -> TaskRecord:
        """Queue a failed or cancelled task again; a worker's task runner starts it."""
        return await self._task_store.retry_task(task_id)

    async def sweep_once(self) -> list[str]:
        """Wake the workflow of every runnable run without a lease (see the module docstring)."""
        woken: list[str] = []
        for run_id in await self._log.claimable(_SWEEP_BATCH, agent_ids=frozenset(self._agents)):
            await self._engine.wake(run_id)
            woken.append(run_id)
        return woken

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs and stop sweeping; runs go on, on the workers."""
        self._draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for work in list(self._background):
            work.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _launcher(self, run_id: str) -> Callable[[], None]:
        """Start the run's workflow in the background, the first time it is called (a
        failed start is left to the sweep)."""
        launched = False

        def launch() -> None:
            nonlocal launched
            if launched or self._draining:
                return
            launched = True
            work = asyncio.create_task(self._start_quietly(run_id))
            self._background.add(work)
            work.add_done_callback(self._background.discard)

        return launch

    async def _start_quietly(self, run_id: str) -> None:
        try:
            await self._engine.start(run_id)
        except EngineUnavailable as exc:
            log.warning("run %s: workflow not started, left to the sweep: %s", run_id, exc)

    async def _sweep_forever(self) -> None:
        while not self._draining:
            try:
                await self.sweep_once()
            except (StoreUnavailable, EngineUnavailable) as exc:
                log.warning("workflow sweep failed: %s", exc)
            await asyncio.sleep(self._timing.sweep_interval_s)
