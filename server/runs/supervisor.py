"""The supervisor: executes one run, fresh or taken over, to its end or until told to stop.

1. Hold the run's lease and listen for cancel requests addressed to its owner.
2. A cancel requested before we got here: commit `abort` + CANCELLED.
3. Prepare: a run with no event yet commits `start` + RUNNING + a STARTED
   checkpoint; a run taken over resumes from its last checkpoint, and if
   events were written after that checkpoint (an attempt interrupted by the
   previous owner's death) commits `step_superseded` first and re-runs that
   step as attempt + 1.
4. Drive the agent loop; every boundary checkpoint is committed atomically
   with the events before it; tool results go through the tool journal.
5. Commit the terminal event with its state: `finish` + SUCCEEDED,
   `error` + FAILED, or `abort` + CANCELLED.

How a supervisor is stopped decides what it writes (Stop): CANCEL writes
`abort`; FENCED (another instance took the run over) writes nothing;
SHUTDOWN writes nothing and releases the lease for another instance.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, replace

from keel.v1 import agent_service_pb2 as pb

from server.agents.checkpoint import Checkpoint, Phase
from server.agents.loop import run_agent_loop
from server.agents.types import AgentSpec, RunInfo
from server.errors import IndexConflict, StaleEpoch
from server.events.log import EventLog, RunRecord, RunState
from server.runs.journal import ToolJournal
from server.runs.leases import LeaseKeeper
from server.runs.writer import EventWriter

log = logging.getLogger(__name__)

# A writer meets these when another writer got to the run first: it must stop, not fail the run.
FENCED_ERRORS = (StaleEpoch, IndexConflict)


class Stop(enum.Enum):
    """Why a supervisor was asked to stop."""

    CANCEL = "cancel"  # CancelRun: commit `abort`
    FENCED = "fenced"  # another instance owns the run now: write nothing
    SHUTDOWN = "shutdown"  # this process exits: write nothing, release the lease


@dataclass(frozen=True, slots=True)
class WriterLimits:
    """How an EventWriter batches (see server/runs/writer.py)."""

    batch_max: int = 1000
    pending_max: int = 5000


class _CheckpointingSink:
    """The loop's EventSink: events through the writer, checkpoints committed with them."""

    def __init__(self, writer: EventWriter) -> None:
        self._writer = writer

    async def emit(self, event: pb.AgentEvent) -> None:
        await self._writer.emit(event)

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        await self._writer.commit(checkpoint=_stamped(checkpoint, self._writer))


def _stamped(checkpoint: Checkpoint, writer: EventWriter) -> bytes:
    # Committed with every event emitted so far, so the next event's index is where it ends.
    return replace(checkpoint, next_index=writer.next_index).encode()


async def _abort(writer: EventWriter, reason: str) -> None:
    await writer.emit(pb.AgentEvent(abort=pb.RunAbort(reason=reason)))
    await writer.commit(RunState.CANCELLED, error=reason)


class _CancelListener:
    def __init__(self, supervisor: Supervisor, run_id: str, task: asyncio.Task[None]) -> None:
        self._supervisor = supervisor
        self._run_id = run_id
        self._task = task

    def on_cancel(self, reason: str) -> None:
        self._supervisor.stop(self._run_id, self._task, Stop.CANCEL, reason)


class Supervisor:
    """Executes runs (see the module docstring); one instance serves every run of a process."""

    def __init__(self, event_log: EventLog, leases: LeaseKeeper, limits: WriterLimits) -> None:
        self._log = event_log
        self._leases = leases
        self._limits = limits
        self._stops: dict[str, tuple[Stop, str]] = {}

    def stop(self, run_id: str, task: asyncio.Task[None], why: Stop, reason: str = "") -> None:
        """Ask the run's task to stop; the first reason given wins."""
        if run_id not in self._stops and not task.done():
            self._stops[run_id] = (why, reason)
            task.cancel()

    async def run(self, record: RunRecord, spec: AgentSpec | None) -> None:
        """Execute `record` (owned by this process at record.epoch) until it ends or stops."""
        run_id = record.run_id
        task = asyncio.current_task()
        assert task is not None
        self._leases.hold(run_id, record.epoch)
        control = await self._log.subscribe_control(run_id, _CancelListener(self, run_id, task))
        writer = EventWriter(
            self._log,
            run_id,
            epoch=record.epoch,
            next_index=record.next_index,
            batch_max=self._limits.batch_max,
            pending_max=self._limits.pending_max,
        )
        try:
            try:
                if record.cancel_reason:  # asked before this process got the run
                    await _abort(writer, record.cancel_reason)
                    return
                if spec is None:
                    raise LookupError(f"this server has no agent {record.agent_id!r}")
                await self._execute(record, spec, writer)
            except asyncio.CancelledError:
                why, reason = self._stops.pop(run_id, (None, ""))
                if why is Stop.CANCEL:
                    await _abort(writer, reason)
                elif why is Stop.SHUTDOWN:
                    await self._leases.release(run_id)
                elif why is None:
                    raise  # not ours: the event loop is going away
                # Stop.FENCED: another instance owns the run; write nothing.
            except FENCED_ERRORS:
                log.info("run %s was taken over by another writer; stopping", run_id)
            except Exception as exc:
                log.info("run %s failed: %r", run_id, exc)
                message = str(exc) or type(exc).__name__
                await writer.emit(
                    pb.AgentEvent(error=pb.RunError(message=message, type=type(exc).__name__))
                )
                await writer.commit(RunState.FAILED, error=message)
        except FENCED_ERRORS:
            log.info("run %s was taken over by another writer; stopping", run_id)
        finally:
            self._stops.pop(run_id, None)
            self._leases.drop(run_id)
            await writer.close()
            await control.close()

    async def _execute(self, record: RunRecord, spec: AgentSpec, writer: EventWriter) -> None:
        resume, attempt = await self._prepare(record, writer)
        info = RunInfo(run_id=record.run_id, counters=self._log)
        result = await run_agent_loop(
            spec,
            record.input,
            run_info=info,
            sink=_CheckpointingSink(writer),
            resume=resume,
            attempt=attempt,
            capabilities=[ToolJournal(self._log, record.run_id, record.epoch)],
        )
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

    async def _prepare(self, record: RunRecord, writer: EventWriter) -> tuple[Checkpoint, int]:
        """Step 3 of the module docstring: the checkpoint to run from and its first attempt."""
        if record.next_index == 0:
            await writer.emit(
                pb.AgentEvent(start=pb.RunStart(agent_id=record.agent_id, input=record.input))
            )
            started = Checkpoint(phase=Phase.STARTED, step=0)
            await writer.commit(RunState.RUNNING, checkpoint=_stamped(started, writer))
            return started, 1
        checkpoint = Checkpoint.decode(record.checkpoint)
        if record.next_index == checkpoint.next_index:
            return checkpoint, 1  # the previous owner died right at a boundary
        [last] = await self._log.read(record.run_id, record.next_index - 1, 1)
        attempt = last.attempt + 1
        await writer.emit(
            pb.AgentEvent(
                step=last.step,
                attempt=attempt,
                step_superseded=pb.StepSuperseded(
                    superseded_step=last.step,
                    superseded_attempt=last.attempt,
                    from_index=checkpoint.next_index,
                ),
            )
        )
        await writer.commit()
        return checkpoint, attempt
