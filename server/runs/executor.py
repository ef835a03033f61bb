"""The local executor: starts runs, executes them in supervisor tasks, takes over orphans.

A run never executes inside an RPC handler: a client disconnecting (which
cancels its handler) only stops that client's stream, never the run.

Ownership (docs/durability.md): the instance that creates a run owns it at
epoch 1 and holds its lease (server/runs/leases.py renews it). If the owner
dies, its lease lapses; every instance sweeps for such runs (at start and
every `sweep_interval_s`), and one of them claims the run (epoch + 1) and
resumes it from its last checkpoint (server/runs/supervisor.py). A stale
owner's writes carry the old epoch and are refused, so it can never write
again; when its lease renewal is refused it stops.

Cancellation: CancelRun stores the request with the run and publishes it.
The owner, wherever it is, aborts the run; a run whose owner is gone (or
that had none: suspended, or waiting in its thread's queue, which the
request makes runnable) is claimed by the canceller, or any sweeper, and
aborted. A request that lands before an owner subscribes is not lost: an
owner checks the record when it starts a run.

Threads: a run on a thread is started through the log's start_thread_run,
which decides atomically whether it becomes the thread's active run, waits
in the thread's queue, or is refused (BusyPolicy). When a thread's active run
ends, its terminal append hands the thread to the next queued run, which is
then runnable without an owner: the instance that ran the ended run claims
it at once, and any sweeper would otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server import logs, metrics
from server.agents.types import AgentSpec
from server.errors import (
    RunNotFound,
    ServerDraining,
    StoreUnavailable,
    ThreadNotFound,
)
from server.events.log import BusyPolicy, EventLog, RunRecord, RunState
from server.goals.records import Goal
from server.runs import admission, decisions
from server.runs.leases import LeaseKeeper
from server.runs.supervisor import RunTask, Stop, Supervisor, WriterLimits
from server.runs.tasks import Tasks
from server.tasks.factory import task_store_for
from server.tasks.records import TaskRecord
from server.tasks.runner import TaskLimits, TaskRunner, stop_if_cancelled
from server.tasks.store import TaskStore

log = logging.getLogger(__name__)

_CLAIM_BATCH = 100
_CANCEL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Timing:
    """The executor's clocks (see server/settings.py)."""

    lease_renew_interval_s: float = 1.0
    sweep_interval_s: float = 1.0
    cancel_wait_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Started:
    """What start() did: the run, and how to make this process execute it.

    `launch` spawns the run here if start() created it ready to execute (not
    waiting in its thread's queue, not existing before); it is idempotent and
    does nothing while the server drains. A Stream calls it once it listens
    to the run, so a live-only run's first events reach it; anything else
    calls it at once.
    """

    run: RunRecord
    launch: Callable[[], None]
    created: bool = True  # False: a run with this request_id existed


@dataclass(frozen=True, slots=True)
class Resumed:
    """What resume() did: where its stream starts, and `launch` as for Started."""

    offset: int
    launch: Callable[[], None]


def _nothing() -> None:
    """The launch of a run this call did not make ready to execute."""


class _Once:
    """A launch that does its work the first time it is called, and never again."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._work: Callable[[], None] | None = work

    def __call__(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            work()


class LocalExecutor:
    """Runs agent runs in supervisor tasks of this process."""

    def __init__(
        self,
        log: EventLog,
        agents: Mapping[str, AgentSpec],
        *,
        instance_id: str,
        limits: WriterLimits | None = None,
        timing: Timing | None = None,
        task_store: TaskStore | None = None,
        task_limits: TaskLimits | None = None,
        next_turn: Callable[[str], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """`next_turn(thread_id)` is called when a run of a thread ends here (it may
        have handed the thread to its next run); by default this process claims
        that run (a Temporal worker instead has the run's workflow take it)."""
        self._log = log
        self._next_turn = next_turn or self._take_thread_turn
        self._agents = dict(agents)
        self._instance_id = instance_id
        self._timing = timing or Timing()
        self._leases = LeaseKeeper(
            log, renew_interval_s=self._timing.lease_renew_interval_s, on_lost=self._on_lease_lost
        )
        task_limits = task_limits or TaskLimits()
        task_store = task_store or task_store_for(log, lease_ttl_s=task_limits.lease_ttl_s)
        self._task_runner = TaskRunner(
            task_store, log, self._agents, instance_id=instance_id, limits=task_limits
        )
        self._task_store = task_store
        self._supervisor = Supervisor(
            log,
            self._leases,
            limits or WriterLimits(),
            Tasks(task_store, self._task_runner, task_limits),
            self._agents,
        )
        self._tasks: dict[str, RunTask] = {}
        self._background: set[asyncio.Task[Any]] = set()  # thread hand-overs, interrupts
        self._sweeper: asyncio.Task[None] | None = None
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

    @property
    def task_runner(self) -> TaskRunner:
        return self._task_runner

    @property
    def running(self) -> frozenset[str]:
        """Ids of the runs this process is executing now."""
        return frozenset(self._tasks)

    def agent(self, agent_id: str) -> AgentSpec:
        return admission.agent_of(self._agents, agent_id)

    def open(self, *, sweep: bool = True) -> None:
        """Start sweeping for orphaned runs (at once, then every sweep_interval_s), and
        running background tasks. Without `sweep`, runs execute only when told to
        (start, resume, execute): a Temporal worker's runs are given by Temporal."""
        if self._sweeper is None and sweep:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sweeper")
        self._task_runner.open()

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
        """Store a new run (server/runs/admission.py), ready to execute here (see
        Started), or waiting for its thread."""
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
            await self._stop_interrupted(admitted.interrupted_run_id)
        record = admitted.run
        if not admitted.created:
            return Started(record, _nothing, created=False)
        if record.state is not RunState.QUEUED:
            return Started(record, _nothing)  # waits for its thread
        spec = self._agents.get(agent_id)
        return Started(record, _Once(lambda: self._launch(record, spec)))

    async def resume(
        self, run_id: str, answers: Sequence[decisions.Decision], request_id: str = ""
    ) -> Resumed:
        """Apply decisions to a suspended run (server/runs/admission.py); when every
        interrupt is answered, this process owns the run again and goes on with it."""
        if self._draining:
            raise ServerDraining()
        decided = await admission.decide(
            self._log,
            owner=self._instance_id,
            run_id=run_id,
            answers=answers,
            request_id=request_id,
        )
        resumed = decided.resumed
        if resumed is None:
            return Resumed(decided.offset, _nothing)
        return Resumed(
            decided.offset,
            _Once(lambda: self._launch(resumed, self._agents.get(resumed.agent_id))),
        )

    async def cancel(self, run_id: str, reason: str) -> RunRecord:
        """Stop a run: it commits `abort` and CANCELLED. An ended run is returned as it is.

        1. Store the request with the run and publish it (its owner aborts it).
        2. Until the run ended or cancel_wait_s passed: abort it here if this
           process owns it, or claim it if its owner is gone and abort it.
        Returns the run as it is then (still live only if its owner is alive
        but slow; the stored request still ends the run).
        """
        reason = reason or "cancelled"
        record = await self._log.request_cancel(run_id, reason)
        deadline = time.monotonic() + self._timing.cancel_wait_s
        while not record.state.terminal and time.monotonic() < deadline:
            task = self._tasks.get(run_id)
            if task is None and not self._draining:
                # An owner that died (or a run that had none) leaves it to us.
                claimed = await self._log.claim(run_id, self._instance_id)
                if claimed is not None:
                    task = self._spawn(claimed, self._agents.get(claimed.agent_id))
            if task is not None:
                self._supervisor.stop(run_id, task, Stop.CANCEL, reason)
                # Shield: the caller's RPC being cancelled must not interrupt the run's last write.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            else:
                await asyncio.sleep(_CANCEL_POLL_S)
            record = await self._log.get_run(run_id)
        return record

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord:
        """Stop a background task (TaskStore.cancel_task) and return it once it ended, or
        as it is after cancel_wait_s (its runner, on another server, is slow to hear)."""
        task = await self._task_store.cancel_task(task_id, reason)
        self._task_runner.stop(task_id, "cancelled")
        deadline = time.monotonic() + self._timing.cancel_wait_s
        while not task.status.ended and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL_S)
            task = await self._task_store.get_task(task_id)
        return task

    async def retry_task(self, task_id: str) -> TaskRecord:
        """Queue a failed or cancelled task again, and look for a slot for it."""
        task = await self._task_store.retry_task(task_id)
        self._task_runner.wake()
        return task

    async def sweep_once(self) -> list[str]:
        """Claim every live run whose lease lapsed and whose agent this process has."""
        claimed: list[str] = []
        if self._draining:
            return claimed
        agent_ids = frozenset(self._agents)  # the others are for instances that serve them
        for run_id in await self._log.claimable(_CLAIM_BATCH, agent_ids=agent_ids):
            if run_id in self._tasks:
                continue
            taken = await self._log.claim(run_id, self._instance_id)
            if taken is not None:
                metrics.TAKEOVERS.inc()
                log.info("took over run %s at epoch %d", run_id, taken.epoch)
                self._spawn(taken, self._agents.get(taken.agent_id))
                claimed.append(run_id)
        return claimed

    async def execute(self, run_id: str, *, half_step: bool = False) -> RunTask | None:
        """Take the run over now, whoever holds its lease, and execute it here.

        For an engine that decides on its own which process executes a run
        (Temporal): the epoch moves on, so an earlier writer, alive or not, is
        fenced out, and the run resumes from its checkpoint (step_superseded
        first if that writer left a partial step). With `half_step` it stops at
        the next half-step boundary too (Supervisor.run). Returns the run's
        task, or None when the run is not runnable (ended, suspended, enqueued,
        unknown).
        """
        earlier = self._tasks.get(run_id)
        if earlier is not None:
            # An attempt the engine gave up on, still going here: it must stop first.
            self._supervisor.stop(run_id, earlier, Stop.FENCED)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(earlier)
        if self._draining:
            raise ServerDraining()
        taken = await self._log.claim(run_id, self._instance_id, force=True)
        if taken is None:
            return None
        return self._spawn(taken, self._agents.get(taken.agent_id), half_step=half_step)

    def stop_run(self, run_id: str, why: Stop) -> None:
        """Ask the run this process executes to stop (see Stop); no-op if it does not."""
        task = self._tasks.get(run_id)
        if task is not None:
            self._supervisor.stop(run_id, task, why)

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, give running ones `grace_s` to finish, then hand the rest back.

        A run handed back stops where it is and releases its lease, so
        another instance claims it at once and resumes it from its last
        checkpoint.
        """
        self._draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for work in list(self._background):
            work.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._task_runner.drain()
        tasks = dict(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=grace_s)
            for run_id, task in tasks.items():
                if task in pending:
                    self._supervisor.stop(run_id, task, Stop.SHUTDOWN)
            if pending:
                log.warning("handing %d unfinished runs back at shutdown", len(pending))
                await asyncio.wait(pending)
        await self._leases.close()

    def _launch(self, record: RunRecord, spec: AgentSpec | None) -> None:
        """Execute a run this process owns (it created or resumed it), unless it drains:
        then the run's lease lapses and another instance takes it."""
        if not self._draining and record.run_id not in self._tasks:
            self._spawn(record, spec)

    def _spawn(
        self, record: RunRecord, spec: AgentSpec | None, *, half_step: bool = False
    ) -> RunTask:
        task = asyncio.create_task(
            self._supervisor.run(record, spec, half_step=half_step),
            name=f"run:{record.run_id}",
            context=logs.run_task_context(record.run_id, record.thread_id),
        )
        run_id = record.run_id
        self._tasks[run_id] = task
        metrics.RUNS_ACTIVE.inc()

        def forget(done: RunTask) -> None:
            metrics.RUNS_ACTIVE.dec()
            if self._tasks.get(run_id) is done:
                del self._tasks[run_id]
            paused = not done.cancelled() and done.exception() is None and done.result()
            if record.thread_id and not self._draining and not paused:
                # The run may have handed its thread to the next queued run.
                self._in_background(self._next_turn(record.thread_id))

        task.add_done_callback(forget)
        return task

    async def _stop_interrupted(self, run_id: str) -> None:
        """Have a run that an INTERRUPT or ROLLBACK asked to cancel write its abort.

        The request is stored and published already (start_thread_run): its
        owner aborts it. Here: stop it if this process owns it, or claim it if
        nobody does (it was suspended, or its owner died); otherwise its
        owner, or a sweeper after its lease lapses, does.
        """
        task = self._tasks.get(run_id)
        if task is not None:
            self._supervisor.stop(run_id, task, Stop.CANCEL)
        elif not self._draining:
            claimed = await self._log.claim(run_id, self._instance_id)
            if claimed is not None:
                self._spawn(claimed, self._agents.get(claimed.agent_id))

    async def _take_thread_turn(self, thread_id: str) -> None:
        """Execute the thread's active run here if it waits for an owner (it was just
        promoted) and this process serves its agent; else a sweeper elsewhere will."""
        try:
            active = (await self._log.get_thread(thread_id)).active_run_id
            if not active or active in self._tasks or self._draining:
                return
            waiting = await self._log.get_run(active)
            if waiting.state.runnable and waiting.agent_id in self._agents:
                claimed = await self._log.claim(active, self._instance_id)
                if claimed is not None:
                    self._spawn(claimed, self._agents.get(claimed.agent_id))
        except (ThreadNotFound, RunNotFound, StoreUnavailable) as exc:
            log.info("thread %s: its next run is left to the sweepers (%s)", thread_id, exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_lease_lost(self, run_id: str) -> None:
        task = self._tasks.get(run_id)
        if task is not None:
            self._supervisor.stop(run_id, task, Stop.FENCED)

    async def _sweep_forever(self) -> None:
        while not self._draining:
            try:
                await self.sweep_once()
            except StoreUnavailable as exc:
                stop_if_cancelled()
                log.warning("sweep failed: %s", exc)
            await asyncio.sleep(self._timing.sweep_interval_s)
