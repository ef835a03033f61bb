"""The local executor: starts runs and executes each in a supervisor task of this process.

A run never executes inside an RPC handler: a client disconnecting (which
cancels its handler) only stops that client's stream, never the run.

Life of a run (every state change is committed together with its event):
1. `start` stores the run as QUEUED (idempotently, keyed by request_id) and
   spawns its supervisor task; the RPC returns at once.
2. The supervisor commits `start` + RUNNING, drives the agent loop through an
   EventWriter, and commits the terminal event with its state: `finish` +
   SUCCEEDED, `error` + FAILED, or `abort` + CANCELLED when CancelRun asked.
3. On shutdown, runs get `shutdown_grace_s` to finish; the rest are left as
   they are in the log (the durable-execution layer takes them over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from keel.v1 import agent_service_pb2 as pb

from server.agents.loop import run_agent_loop
from server.agents.types import AgentSpec, RunInfo
from server.errors import (
    IndexConflict,
    RequestIdReused,
    ServerDraining,
    StaleEpoch,
    UnknownAgent,
)
from server.events.log import EventLog, RunRecord, RunState
from server.runs.writer import EventWriter

log = logging.getLogger(__name__)

# Run ids of runs started with a request_id derive from it, so a retried
# request finds the run it started without any extra lookup key.
_REQUEST_NAMESPACE = uuid.UUID("6f2a0d3c-5b1e-4c8e-9d7a-3e4f5a6b7c8d")


@dataclass(frozen=True, slots=True)
class WriterLimits:
    """How an EventWriter batches (see server/runs/writer.py)."""

    batch_max: int = 1000
    pending_max: int = 5000


# A writer meets these when another writer got to the run first: it must stop, not fail the run.
_FENCED = (StaleEpoch, IndexConflict)
_ORPHAN_ABORT_TRIES = 5


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
    ) -> None:
        self._log = log
        self._agents = dict(agents)
        self._instance_id = instance_id
        self._limits = limits or WriterLimits()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._draining = False

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        return self._agents

    @property
    def running(self) -> frozenset[str]:
        """Ids of the runs this process is executing now."""
        return frozenset(self._tasks)

    def agent(self, agent_id: str) -> AgentSpec:
        spec = self._agents.get(agent_id)
        if spec is None:
            raise UnknownAgent(agent_id, sorted(self._agents))
        return spec

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
        self._tasks[record.run_id] = asyncio.create_task(
            self._supervise(record, spec), name=f"run:{record.run_id}"
        )
        return record

    async def cancel(self, run_id: str, reason: str) -> RunRecord:
        """Stop a run: it commits `abort` and CANCELLED. An ended run is returned as it is."""
        record = await self._log.get_run(run_id)
        if record.state.terminal:
            return record
        task = self._tasks.get(run_id)
        if task is not None:
            self._cancel_reasons.setdefault(run_id, reason or "cancelled")
            task.cancel()
            # Shield: the caller's RPC being cancelled must not interrupt the run's last write.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        else:
            await self._abort_orphan(record, reason or "cancelled")
        return await self._log.get_run(run_id)

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, give running ones `grace_s` to finish, then stop the rest."""
        self._draining = True
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("left %d runs unfinished at shutdown", len(pending))
                await asyncio.wait(pending)

    async def _supervise(self, record: RunRecord, spec: AgentSpec) -> None:
        writer = EventWriter(
            self._log,
            record.run_id,
            epoch=record.epoch,
            next_index=record.next_index,
            batch_max=self._limits.batch_max,
            pending_max=self._limits.pending_max,
        )
        try:
            await writer.emit(
                pb.AgentEvent(start=pb.RunStart(agent_id=record.agent_id, input=record.input))
            )
            await writer.commit(RunState.RUNNING)
            info = RunInfo(run_id=record.run_id, counters=self._log)
            result = await run_agent_loop(spec, record.input, run_info=info, sink=writer)
            await writer.emit(
                pb.AgentEvent(
                    finish=pb.RunFinish(
                        output_text=result.output_text,
                        output_json=result.output_json,
                        usage=result.usage,
                    )
                )
            )
            await writer.commit(RunState.SUCCEEDED)
        except asyncio.CancelledError:
            reason = self._cancel_reasons.pop(record.run_id, None)
            if reason is None:
                raise  # shutdown: the run stays live in the log for another owner
            await writer.emit(pb.AgentEvent(abort=pb.RunAbort(reason=reason)))
            await writer.commit(RunState.CANCELLED, error=reason)
        except _FENCED:
            log.info("run %s was taken over by another writer; stopping", record.run_id)
        except Exception as exc:
            log.info("run %s failed: %r", record.run_id, exc)
            message = str(exc) or type(exc).__name__
            try:
                await writer.emit(
                    pb.AgentEvent(error=pb.RunError(message=message, type=type(exc).__name__))
                )
                await writer.commit(RunState.FAILED, error=message)
            except _FENCED:
                log.info("run %s was taken over by another writer; stopping", record.run_id)
        finally:
            await writer.close()
            self._tasks.pop(record.run_id, None)

    async def _abort_orphan(self, record: RunRecord, reason: str) -> None:
        """Cancel a live run no task of this process executes (e.g. left by a process that exited).

        The abort is appended at the run's next index; if its owner still
        writes, one of the two appends meets IndexConflict, and a writer that
        loses stops (see _supervise), so we retry from a fresh record.
        """
        for _ in range(_ORPHAN_ABORT_TRIES):
            if record.state.terminal:
                return
            writer = EventWriter(
                self._log, record.run_id, epoch=record.epoch, next_index=record.next_index
            )
            try:
                await writer.emit(pb.AgentEvent(abort=pb.RunAbort(reason=reason)))
                await writer.commit(RunState.CANCELLED, error=reason)
                return
            except _FENCED:
                record = await self._log.get_run(record.run_id)
            finally:
                await writer.close()
