"""The local executor: starts runs, executes them in supervisor tasks, takes over orphans.

A run never executes inside an RPC handler: a client disconnecting (which
cancels its handler) only stops that client's stream, never the run.

Ownership (DESIGN section 6): the instance that creates a run owns it at
epoch 1 and holds its lease (server/runs/leases.py renews it). If the owner
dies, its lease lapses; every instance sweeps for such runs (at start and
every `sweep_interval_s`), and one of them claims the run (epoch + 1) and
resumes it from its last checkpoint (server/runs/supervisor.py). A stale
owner's writes carry the old epoch and are refused, so it can never write
again; when its lease renewal is refused it stops.

Cancellation: CancelRun stores the request with the run and publishes it.
The owner, wherever it is, aborts the run; a run whose owner is gone is
claimed by the canceller and aborted. A request that lands before an owner
subscribes is not lost: an owner checks the record when it starts a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.agents.checkpoint import Checkpoint
from server.agents.types import AgentSpec
from server.errors import (
    ConcurrentModification,
    RequestIdReused,
    RunNotSuspended,
    ServerDraining,
    StoreUnavailable,
    UnknownAgent,
)
from server.events.log import EventLog, RunRecord, RunState
from server.runs import decisions
from server.runs.leases import LeaseKeeper
from server.runs.supervisor import Stop, Supervisor, WriterLimits

log = logging.getLogger(__name__)

# Run ids of runs started with a request_id derive from it, so a retried
# request finds the run it started without any extra lookup key.
_REQUEST_NAMESPACE = uuid.UUID("6f2a0d3c-5b1e-4c8e-9d7a-3e4f5a6b7c8d")
_CLAIM_BATCH = 100
_CANCEL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Timing:
    """The executor's clocks (see server/settings.py)."""

    lease_renew_interval_s: float = 1.0
    sweep_interval_s: float = 1.0
    cancel_wait_s: float = 10.0


def run_id_for(request_id: str) -> str:
    """The run id of a new run: derived from request_id if given, random otherwise."""
    if request_id:
        return uuid.uuid5(_REQUEST_NAMESPACE, request_id).hex
    return uuid.uuid4().hex


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    ) -> None:
        self._log = log
        self._agents = dict(agents)
        self._instance_id = instance_id
        self._timing = timing or Timing()
        self._leases = LeaseKeeper(
            log, renew_interval_s=self._timing.lease_renew_interval_s, on_lost=self._on_lease_lost
        )
        self._supervisor = Supervisor(log, self._leases, limits or WriterLimits())
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._draining = False

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        return self._agents

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def running(self) -> frozenset[str]:
        """Ids of the runs this process is executing now."""
        return frozenset(self._tasks)

    def agent(self, agent_id: str) -> AgentSpec:
        spec = self._agents.get(agent_id)
        if spec is None:
            raise UnknownAgent(agent_id, sorted(self._agents))
        return spec

    def open(self) -> None:
        """Start sweeping for orphaned runs (at once, then every sweep_interval_s)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sweeper")

    async def start(self, agent_id: str, input: str, request_id: str = "") -> RunRecord:
        """Store a new run and start executing it; a repeated request_id returns its run."""
        if self._draining:
            raise ServerDraining()
        spec = self.agent(agent_id)
        if spec.validate_input is not None:
            spec.validate_input(input)
        now = _now_ms()
        record, created = await self._log.create_run(
            RunRecord(
                run_id=run_id_for(request_id),
                agent_id=agent_id,
                input=input,
                request_id=request_id,
                state=RunState.QUEUED,
                create_time_ms=now,
                update_time_ms=now,
                owner=self._instance_id,
            )
        )
        if not created:
            if (record.agent_id, record.input) != (agent_id, input):
                raise RequestIdReused(request_id, record.run_id)
            return record
        self._spawn(record, spec)
        return record

    async def resume(
        self, run_id: str, answers: Sequence[decisions.Decision], request_id: str = ""
    ) -> int:
        """Apply decisions to a suspended run; return the offset its Resume stream starts at.

        1. A request_id seen before: the same decisions return the same offset,
           others are RequestIdReused.
        2. Decisions already stored: equal ones are a repeat (same offset), a
           different one is InterruptResolved.
        3. Otherwise the run must be SUSPENDED (RunNotSuspended) and every
           decision must answer one of its pending interrupts, with a fitting
           kind (InvalidArgument).
        4. Store the decisions with a compare-and-set on the run's epoch
           (ConcurrentModification if another request changed it first). When
           every interrupt is answered, this process owns the run again and
           goes on with it.
        The offset is the index of the first event after the suspension.
        """
        if self._draining:
            raise ServerDraining()
        fingerprint = decisions.fingerprint(answers)
        record = await self._log.get_run(run_id)
        if request_id:
            seen = await self._log.resume_request(run_id, request_id)
            if seen is not None:
                earlier = json.loads(seen)
                if earlier["fingerprint"] != fingerprint:
                    raise RequestIdReused(request_id, run_id)
                return int(earlier["offset"])
        stored = decisions.load(record)
        repeat = decisions.repeat_offset(run_id, stored, answers)
        if repeat is not None:
            return repeat
        if record.state is not RunState.SUSPENDED:
            raise RunNotSuspended(run_id, record.state.value)
        checkpoint = Checkpoint.decode(record.checkpoint)
        decisions.check_answers(checkpoint, answers)
        offset = checkpoint.next_index
        stored.update({d.tool_call_id: decisions.Stored(d, offset) for d in answers})
        complete = all(i["tool_call_id"] in stored for i in checkpoint.interrupts)
        try:
            resumed = await self._log.decide(
                run_id,
                expected_epoch=record.epoch,
                decisions=decisions.dump(stored),
                owner=self._instance_id,
                resume=complete,
                request_id=request_id,
                request_record=json.dumps({"fingerprint": fingerprint, "offset": offset}).encode(),
            )
        except ConcurrentModification:
            # The same decisions, sent twice at once, are still a repeat.
            now = decisions.load(await self._log.get_run(run_id))
            again = decisions.repeat_offset(run_id, now, answers)
            if again is None:
                raise
            return again
        if complete:
            self._spawn(resumed, self._agents.get(resumed.agent_id))
        return offset

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
                # A suspended run has no owner: take it, to write its abort.
                claimed = await self._log.claim(run_id, self._instance_id, suspended=True)
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
                log.info("took over run %s at epoch %d", run_id, taken.epoch)
                self._spawn(taken, self._agents.get(taken.agent_id))
                claimed.append(run_id)
        return claimed

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

    def _spawn(self, record: RunRecord, spec: AgentSpec | None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._supervisor.run(record, spec), name=f"run:{record.run_id}")
        run_id = record.run_id
        self._tasks[run_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(run_id) is done:
                del self._tasks[run_id]

        task.add_done_callback(forget)
        return task

    def _on_lease_lost(self, run_id: str) -> None:
        task = self._tasks.get(run_id)
        if task is not None:
            self._supervisor.stop(run_id, task, Stop.FENCED)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except StoreUnavailable as exc:
                log.warning("sweep failed: %s", exc)
            await asyncio.sleep(self._timing.sweep_interval_s)
