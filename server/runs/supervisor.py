"""The supervisor: executes one run, fresh or taken over, to its end or until told to stop.

1. Hold the run's lease and listen for cancel requests addressed to its owner.
2. A cancel requested before we got here: commit `abort` + CANCELLED.
3. Prepare: a run with no event yet commits `start` + RUNNING + a STARTED
   checkpoint; a run taken over resumes from its last checkpoint, and if
   events were written after that checkpoint (an attempt interrupted by the
   previous owner's death) commits `step_superseded` first and re-runs that
   step as attempt + 1.
   A run resumed after a suspension (every interrupt answered) commits
   `resumed` + RUNNING + a RESUMED checkpoint first.
4. Drive the agent loop; every boundary checkpoint is committed atomically
   with the events before it; tool results go through the tool journal.
5. Commit the terminal event with its state: `finish` + SUCCEEDED,
   `error` + FAILED, or `abort` + CANCELLED; or, when a tool call waits for
   a human, `tool_call_approval`/`tool_call_suspended` + `suspended` +
   SUSPENDED + the SUSPENDED checkpoint, in one append: the suspension is
   persisted before anyone hears of it, and the run then holds no lease and
   no task until Resume.

Background tasks (server/runs/tasks.py): while the run has an owner, its
task log becomes TaskUpdate events; a background tool call makes a task;
with until_idle, the model's being done is followed by a wait for the run's
tasks, each outcome given to the model as a new message, until none is
left; a cancelled run cancels the tasks it started.

Goals (server/runs/goals.py): a run with a goal has each attempt judged
when it is over (after its tasks, with until_idle); an attempt that falls
short, with attempts left, is followed by the judge's reason as a new
message and the loop goes on, in the same run; the last judgment is
committed with `finish`, which says whether the goal was met.

A run on a thread starts from the thread's history (read again on every
takeover or resume: the thread cannot change while it has an active run),
and its terminal append carries the run's own messages to the thread: all
of them when it finished, those of its last checkpoint when it failed or was
cancelled (server/threads/history.py).

How a supervisor is stopped decides what it writes (Stop): CANCEL writes
`abort`; FENCED (another instance took the run over) writes nothing;
SHUTDOWN writes nothing and releases the lease for another instance.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from keel.v1 import agent_service_pb2 as pb
from pydantic_ai.messages import ModelMessage

from server import metrics, tracing
from server.agents.checkpoint import Checkpoint, Phase
from server.agents.loop import run_agent_loop
from server.agents.types import AgentSpec, LoopResult, RunInfo
from server.errors import IndexConflict, StaleEpoch, StoreUnavailable
from server.events.log import EventLog, RunRecord, RunState, Subscription
from server.goals.records import Goal
from server.runs import decisions
from server.runs.capability import RunCapability
from server.runs.goals import Judgment, judge_attempt, retry_checkpoint
from server.runs.journal import ToolJournal
from server.runs.leases import LeaseKeeper
from server.runs.tasks import (
    TaskEvents,
    Tasks,
    next_outcome,
    outcome_checkpoint,
    outcome_key,
    waited,
    waiting_checkpoint,
)
from server.runs.writer import EventWriter
from server.tasks.capability import BackgroundTools
from server.threads import history

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
    linger_s: float = 0.0


class _Boundary(Exception):
    """Raised by the sink at a half-step boundary of a run executed one half-step at a
    time: the checkpoint is committed, the supervisor stops there."""

    def __init__(self, phase: Phase) -> None:
        super().__init__(phase.value)
        self.phase = phase


RunTask = asyncio.Task["Phase | None"]


class _CheckpointingSink:
    """The loop's EventSink: events through the writer, checkpoints committed with them.

    It remembers the last checkpoint committed (or the one the run was taken
    over at): a run that fails or is cancelled leaves that checkpoint's
    messages in its thread. And it stamps every checkpoint with what the
    run, beyond its agent loop, has done so far (`fed`: the task outcomes
    given to the model; `judged`: the attempts its goal's judge evaluated),
    so a checkpoint the loop takes mid-step does not forget it.
    """

    def __init__(self, writer: EventWriter, record: RunRecord, *, half_step: bool) -> None:
        self._writer = writer
        self._half_step = half_step
        taken_over = Checkpoint.decode(record.checkpoint) if record.checkpoint else None
        self.last: Checkpoint | None = taken_over if record.thread_id else None
        self.fed: tuple[str, ...] = taken_over.fed if taken_over else ()
        self.judged = taken_over.judged if taken_over else 0

    @property
    def writer(self) -> EventWriter:
        return self._writer

    async def emit(self, event: pb.AgentEvent) -> None:
        await self._writer.emit(event)

    def stamped(self, checkpoint: Checkpoint) -> Checkpoint:
        """`checkpoint` with what the run did beyond its agent loop."""
        return replace(checkpoint, fed=self.fed, judged=self.judged)

    async def checkpoint(
        self,
        checkpoint: Checkpoint,
        *,
        events: Sequence[pb.AgentEvent] = (),
        goal_progress: str | None = None,
    ) -> None:
        checkpoint = self.stamped(checkpoint)
        await self._writer.commit(checkpoint=checkpoint, events=events, goal_progress=goal_progress)
        self.last = checkpoint

    async def at_boundary(self) -> None:
        if self._half_step and self.last is not None:
            raise _Boundary(self.last.phase)

    @property
    def last_messages(self) -> bytes | None:
        return None if self.last is None else self.last.messages


def _thread_entries(record: RunRecord, messages: bytes | None) -> list[bytes]:
    """What the run's terminal append adds to its thread (nothing for a run on its own):
    `messages`, its own messages at the end or at its last checkpoint; a run that
    ended before any leaves its user prompt."""
    if not record.thread_id:
        return []
    entries = history.entries(record.run_id, messages or b"[]")
    return entries or [history.prompt_entry(record.run_id, record.input)]


def _interrupt_event(checkpoint: Checkpoint, interrupt: dict[str, Any]) -> pb.AgentEvent:
    event = pb.AgentEvent(step=checkpoint.step, attempt=checkpoint.attempt)
    fields = {k: interrupt[k] for k in ("tool_call_id", "tool_name", "args_json")}
    if interrupt["kind"] == "approval":
        event.tool_call_approval.CopyFrom(pb.ToolCallApproval(**fields))
    else:
        event.tool_call_suspended.CopyFrom(pb.ToolCallSuspended(**fields))
    return event


class _CancelListener:
    def __init__(self, supervisor: Supervisor, run_id: str, task: RunTask) -> None:
        self._supervisor = supervisor
        self._run_id = run_id
        self._task = task

    def on_cancel(self, reason: str) -> None:
        self._supervisor.stop(self._run_id, self._task, Stop.CANCEL, reason)


class Supervisor:
    """Executes runs (see the module docstring); one instance serves every run of a process."""

    def __init__(
        self,
        event_log: EventLog,
        leases: LeaseKeeper,
        limits: WriterLimits,
        tasks: Tasks,
        agents: Mapping[str, AgentSpec],
    ) -> None:
        self._log = event_log
        self._agents = agents  # the judges of goals among them
        self._leases = leases
        self._limits = limits
        self._tasks = tasks
        self._stops: dict[str, tuple[Stop, str]] = {}
        self._started: set[str] = set()  # runs whose run() has begun

    def stop(self, run_id: str, task: RunTask, why: Stop, reason: str = "") -> None:
        """Ask the run's task to stop; the first reason given wins.

        A task cancelled before its coroutine begins never runs it, so it
        could not write the abort (or release the lease): a task that has
        not begun is left to find the request when it does.
        """
        if run_id not in self._stops and not task.done():
            self._stops[run_id] = (why, reason)
            if run_id in self._started:
                task.cancel()

    async def run(
        self, record: RunRecord, spec: AgentSpec | None, *, half_step: bool = False
    ) -> Phase | None:
        """Execute `record` (owned by this process at record.epoch) until it ends or stops.

        With `half_step`, stop at the first half-step boundary too (a response
        whose tool calls are still to run, or a complete step) and return that
        checkpoint's phase: the next half-step may run anywhere, taking the run
        over from it. Returns None otherwise.
        """
        run_id = record.run_id
        boundary: Phase | None = None
        self._started.add(run_id)
        task = asyncio.current_task()
        assert task is not None
        self._leases.hold(run_id, record.epoch)
        control: Subscription | None = None
        writer = EventWriter(
            self._log,
            run_id,
            epoch=record.epoch,
            next_index=record.next_index,
            batch_max=self._limits.batch_max,
            pending_max=self._limits.pending_max,
            linger_s=self._limits.linger_s,
            task_mark=Checkpoint.decode(record.checkpoint).task_mark if record.checkpoint else 0,
            agent_id=record.agent_id,
        )
        sink = _CheckpointingSink(writer, record, half_step=half_step)
        task_events = TaskEvents(self._tasks.store, run_id, writer)
        try:
            control = await self._log.subscribe_control(run_id, _CancelListener(self, run_id, task))
            if record.next_index > 0:
                # It may have made tasks already; a run without events yet has none, and
                # starts listening to its task log when it makes its first one (_loop).
                await task_events.open()
            try:
                if run_id in self._stops:  # told to stop before it began
                    await self._stopped(run_id, writer, sink)
                    return None
                if record.cancel_reason:  # asked before this process got the run
                    await self._abort(writer, record, sink)
                    return None
                if spec is None:
                    raise LookupError(f"this server has no agent {record.agent_id!r}")
                with tracing.run_span(run_id, record.agent_id, record.epoch, record.trace_context):
                    await self._execute(record, spec, sink, writer, task_events)
            except _Boundary as reached:
                # Task updates may have followed the boundary's checkpoint: commit
                # the checkpoint again after them, so the next owner starts right
                # where this one stopped (no step_superseded for a clean stop). The
                # lease stays until it lapses: the next half-step's owner takes the
                # run over at once, and if none comes the run is a lapsed orphan.
                await task_events.close()
                assert sink.last is not None
                await writer.commit(checkpoint=sink.last)
                boundary = reached.phase
            except asyncio.CancelledError:
                if run_id not in self._stops:
                    raise  # not ours: the event loop is going away
                await self._stopped(run_id, writer, sink)
            except FENCED_ERRORS:
                metrics.FENCED_WRITES.inc()
                log.info("run %s was taken over by another writer; stopping", run_id)
            except StoreUnavailable as exc:
                # Not the run's failure: stop here. The lease lapses, and this or
                # another instance resumes the run from its checkpoint later.
                log.warning("run %s stopped: the store is unreachable (%s)", run_id, exc)
            except Exception as exc:
                log.info("run %s failed: %r", run_id, exc)
                message = str(exc) or type(exc).__name__
                error = pb.AgentEvent(error=pb.RunError(message=message, type=type(exc).__name__))
                await writer.commit(
                    RunState.FAILED,
                    error=message,
                    events=[error],
                    thread_messages=_thread_entries(record, sink.last_messages),
                )
        except FENCED_ERRORS:
            metrics.FENCED_WRITES.inc()
            log.info("run %s was taken over by another writer; stopping", run_id)
        except StoreUnavailable as exc:
            log.warning("run %s stopped: the store is unreachable (%s)", run_id, exc)
        finally:
            self._stops.pop(run_id, None)
            self._started.discard(run_id)
            self._leases.drop(run_id)
            await task_events.close()
            await writer.close()
            if control is not None:
                await control.close()
        return boundary

    async def _stopped(self, run_id: str, writer: EventWriter, sink: _CheckpointingSink) -> None:
        """Do what the stop request says (see Stop).

        The request stays recorded until the run's task ends (run's finally), so a
        second stop (CancelRun stops a run it finds here directly, and its owner
        also hears the request on the run's control channel) cannot cancel the
        abort half-way: after its commit, before it cancels the run's tasks.
        """
        why, _ = self._stops[run_id]
        if why is Stop.CANCEL:
            # The stored request is the record: its first reason, and whether
            # another run of the thread interrupted this one.
            await self._abort(writer, await self._log.get_run(run_id), sink)
        elif why is Stop.SHUTDOWN:
            await self._leases.release(run_id)
        # Stop.FENCED: another instance owns the run; write nothing.

    async def _abort(
        self, writer: EventWriter, record: RunRecord, sink: _CheckpointingSink
    ) -> None:
        reason = record.cancel_reason or "cancelled"
        abort = pb.AgentEvent(
            abort=pb.RunAbort(
                reason=reason,
                interrupted_by_run_id=record.interrupted_by,
                rolled_back=record.rollback,
            )
        )
        await writer.commit(
            RunState.CANCELLED,
            error=reason,
            events=[abort],
            thread_messages=_thread_entries(record, sink.last_messages),
        )
        # The tasks it started stop with it (a task already running, once its runner hears).
        for started in await self._tasks.store.run_tasks(record.run_id):
            if not started.status.ended:
                await self._tasks.store.cancel_task(started.task_id, f"run cancelled: {reason}")

    async def _execute(
        self,
        record: RunRecord,
        spec: AgentSpec,
        sink: _CheckpointingSink,
        writer: EventWriter,
        task_events: TaskEvents,
    ) -> None:
        resume, attempt = await self._prepare(record, writer)
        earlier = []
        if record.thread_id:
            earlier = history.history(
                await self._log.thread_messages(record.thread_id, 0, history.ALL)
            )
        if resume.phase is Phase.WAITING:  # taken over while it waited for its tasks
            result = waited(resume)
        else:
            result = await self._loop(record, spec, sink, task_events, resume, attempt, earlier)
        waiting = resume if resume.phase is Phase.WAITING else None
        goal = Goal.decode(record.goal)
        judged: Judgment | None = None
        while True:
            result = await self._until_idle(
                record, spec, sink, task_events, result, waiting, earlier
            )
            if goal is None or result.suspended is not None:
                break
            # The attempt is over: the judge decides whether the run goes on.
            run_info = RunInfo(run_id=record.run_id, counters=self._log)
            judged = await judge_attempt(self._agents, goal, result, sink.judged + 1, run_info)
            sink.judged = judged.attempt
            if judged.final:
                break
            retry = retry_checkpoint(result, judged)
            await sink.checkpoint(
                retry, events=[judged.event], goal_progress=judged.progress.encode()
            )
            waiting = None
            result = await self._loop(record, spec, sink, task_events, retry, 1, earlier)
        if result.suspended is not None:
            suspension = result.suspended
            announcements = [_interrupt_event(suspension, i) for i in suspension.interrupts]
            suspended = pb.AgentEvent(
                step=suspension.step,
                attempt=suspension.attempt,
                suspended=pb.RunSuspended(
                    tool_call_ids=[i["tool_call_id"] for i in suspension.interrupts]
                ),
            )
            await writer.commit(
                RunState.SUSPENDED,
                events=[*announcements, suspended],
                checkpoint=sink.stamped(suspension),
            )
            return
        finish = pb.AgentEvent(
            finish=pb.RunFinish(
                output_text=result.output_text,
                output_json=result.output_json,
                usage=result.usage,
            )
        )
        if judged is not None:
            finish.finish.goal_met = judged.verdict.satisfied
        await writer.commit(
            RunState.SUCCEEDED,
            events=[finish] if judged is None else [judged.event, finish],
            thread_messages=_thread_entries(record, result.messages),
            goal_progress=None if judged is None else judged.progress.encode(),
        )

    async def _until_idle(
        self,
        record: RunRecord,
        spec: AgentSpec,
        sink: _CheckpointingSink,
        task_events: TaskEvents,
        result: LoopResult,
        waiting: Checkpoint | None,
        earlier: list[ModelMessage],
    ) -> LoopResult:
        """With until_idle, wait for the run's tasks after the model is done with `result`,
        giving each outcome to the model as a new message, until none is left; return the
        model's last result. `waiting`: the WAITING checkpoint already committed, if any."""
        while record.until_idle and result.suspended is None:
            rings = task_events.rings
            await task_events.emit_new()
            outcome = next_outcome(await self._tasks.store.run_tasks(record.run_id), sink.fed)
            if outcome is False:
                break  # none left: the run finishes with the model's last output
            if outcome is True:
                if waiting is None:
                    waiting = waiting_checkpoint(result)
                    await sink.checkpoint(waiting)
                await task_events.rung_since(rings)
                continue
            told = outcome_checkpoint(result, outcome)
            sink.fed = (*sink.fed, outcome_key(outcome))
            await sink.checkpoint(told)
            waiting = None
            result = await self._loop(record, spec, sink, task_events, told, 1, earlier)
        return result

    async def _loop(
        self,
        record: RunRecord,
        spec: AgentSpec,
        sink: _CheckpointingSink,
        task_events: TaskEvents,
        resume: Checkpoint,
        attempt: int,
        earlier: list[ModelMessage],
    ) -> LoopResult:
        """Drive the agent loop from `resume` until the model is done or the run suspends."""
        deferred = None
        if resume.phase in (Phase.SUSPENDED, Phase.RESUMED):
            deferred = decisions.deferred_results(resume, record)
        background = BackgroundTools(
            self._tasks.store,
            self._tasks.runner,
            record,
            limits=self._tasks.limits,
            agent_limit=spec.max_concurrent_tasks,
            on_task=task_events.open,
        )
        return await run_agent_loop(
            spec,
            record.input,
            run_info=RunInfo(run_id=record.run_id, counters=self._log),
            sink=sink,
            resume=resume,
            attempt=attempt,
            capabilities=[
                RunCapability(
                    ToolJournal(self._log, record.run_id, record.epoch, sink.writer), background
                )
            ],
            deferred=deferred,
            history=earlier,
            conversation_id=record.thread_id or None,
        )

    async def _prepare(self, record: RunRecord, writer: EventWriter) -> tuple[Checkpoint, int]:
        """Step 3 of the module docstring: the checkpoint to run from and its first attempt."""
        if record.next_index == 0:
            start = pb.AgentEvent(start=pb.RunStart(agent_id=record.agent_id, input=record.input))
            started = Checkpoint(phase=Phase.STARTED, step=0)
            await writer.commit(RunState.RUNNING, events=[start], checkpoint=started)
            return started, 1
        checkpoint = Checkpoint.decode(record.checkpoint)
        if checkpoint.phase is Phase.SUSPENDED:
            # Every interrupt is answered (that is how the run became runnable
            # again): announce it, and checkpoint that the decisions apply.
            ids = [i["tool_call_id"] for i in checkpoint.interrupts]
            resumed_event = pb.AgentEvent(
                step=checkpoint.step,
                attempt=checkpoint.attempt,
                resumed=pb.RunResumed(tool_call_ids=ids),
            )
            resumed = replace(checkpoint, phase=Phase.RESUMED)
            await writer.commit(RunState.RUNNING, events=[resumed_event], checkpoint=resumed)
            return resumed, checkpoint.attempt
        if record.next_index == checkpoint.next_index:
            # The previous owner died right at a boundary: nothing to supersede.
            # Mid-step, the same attempt goes on; after a step, the next starts at 1.
            mid_step = checkpoint.phase in (Phase.RESPONSE, Phase.RESUMED)
            return checkpoint, checkpoint.attempt if mid_step else 1
        if record.live_only:  # its events are not kept: its record knows the last one's
            last_step, last_attempt = record.last_step, record.last_attempt
        else:
            [last] = await self._log.read(record.run_id, record.next_index - 1, 1)
            last_step, last_attempt = last.step, last.attempt
        attempt = last_attempt + 1
        superseded = pb.AgentEvent(
            step=last_step,
            attempt=attempt,
            step_superseded=pb.StepSuperseded(
                superseded_step=last_step,
                superseded_attempt=last_attempt,
                from_index=checkpoint.next_index,
            ),
        )
        await writer.commit(RunState.RUNNING, events=[superseded])
        return checkpoint, attempt
