"""What every executor does with a new run or a Resume before executing anything.

Both executors (local and Temporal) store a run, and Resume's decisions, the
same way; they differ only in who then executes the run. Keeping these steps
here is what makes a client see the same answers, and the same errors, from
either executor.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server import metrics, tracing
from server.agents.checkpoint import Checkpoint
from server.agents.types import AgentSpec
from server.errors import ConcurrentModification, RequestIdReused, RunNotSuspended, UnknownAgent
from server.events.log import BusyPolicy, EventLog, RunRecord, RunState
from server.goals.judge import judge_of
from server.goals.records import Goal
from server.ids import derived_id
from server.runs import decisions

# Run ids of runs started with a request_id derive from it, so a retried
# request finds the run it started without any extra lookup key.
_REQUEST_NAMESPACE = uuid.UUID("6f2a0d3c-5b1e-4c8e-9d7a-3e4f5a6b7c8d")


def run_id_for(request_id: str, thread_id: str = "", tenant: str = "") -> str:
    """The run id of a new run: derived from request_id (and its tenant) if given,
    random otherwise.

    A run on a thread has the id "<thread_id>:<32 hex digits>", which puts its
    keys in its thread's slot (server/events/keys.py).
    """
    own = derived_id(_REQUEST_NAMESPACE, request_id, tenant) if request_id else uuid.uuid4().hex
    return f"{thread_id}:{own}" if thread_id else own


@dataclass(frozen=True, slots=True)
class Admitted:
    """A run as admit() left it.

    `created` is False when a run with the request_id existed already;
    `interrupted_run_id` names the thread's active run that an INTERRUPT or
    ROLLBACK asked to stop (its cancel request is stored and published).
    """

    run: RunRecord
    created: bool
    interrupted_run_id: str = ""


@dataclass(frozen=True, slots=True)
class Decided:
    """What decide() did: the offset Resume's stream starts at, and the run made
    runnable again (every interrupt answered), or None."""

    offset: int
    resumed: RunRecord | None = None


def agent_of(agents: Mapping[str, AgentSpec], agent_id: str) -> AgentSpec:
    spec = agents.get(agent_id)
    if spec is None:
        raise UnknownAgent(agent_id, sorted(agents))
    return spec


async def admit(
    log: EventLog,
    agents: Mapping[str, AgentSpec],
    *,
    owner: str,
    agent_id: str,
    input: str,
    request_id: str = "",
    thread_id: str = "",
    policy: BusyPolicy = BusyPolicy.REJECT,
    until_idle: bool = False,
    goal: Goal | None = None,
    schedule_id: str = "",
    tenant: str = "",
) -> Admitted:
    """Store a new run, owned by `owner` at epoch 1, or find the one of its request_id.

    A repeated request_id returns its run (RequestIdReused if the agent or
    input differ). A run on a thread goes by the thread's state and `policy`:
    ThreadNotFound, ThreadBusy (REJECT), or it becomes the thread's active
    run, or waits in its queue (ENQUEUE, state ENQUEUED), asking the active
    run to stop (INTERRUPT, ROLLBACK). The run pursues `goal`, or else its
    agent's default goal, if any (InvalidArgument when the goal's judge is
    not an agent that judges).
    """
    spec = agent_of(agents, agent_id)
    if spec.validate_input is not None:
        spec.validate_input(input)
    goal = goal or spec.default_goal
    if goal is not None:
        judge_of(agents, goal)
    now = time.time_ns() // 1_000_000
    retention_s = spec.ended_run_retention_s
    new = RunRecord(
        run_id=run_id_for(request_id, thread_id, tenant),
        agent_id=agent_id,
        input=input,
        request_id=request_id,
        state=RunState.QUEUED,
        create_time_ms=now,
        update_time_ms=now,
        owner=owner,
        thread_id=thread_id,
        live_only=not spec.resumable,
        terminal_ttl_ms=0 if retention_s is None else max(1, round(retention_s * 1000)),
        until_idle=until_idle,
        schedule_id=schedule_id,
        goal="" if goal is None else goal.encode(),
        trace_context=tracing.current_context(),
        tenant=tenant,
    )
    interrupted = ""
    if thread_id:
        outcome = await log.start_thread_run(new, policy)
        record, created = outcome.run, outcome.created
        interrupted = outcome.interrupted_run_id
    else:
        record, created = await log.create_run(new)
    if not created and (record.agent_id, record.input) != (agent_id, input):
        raise RequestIdReused(request_id, record.run_id)
    if created:
        metrics.RUNS_STARTED.labels(agent_id).inc()
    return Admitted(record, created, interrupted)


async def decide(
    log: EventLog,
    *,
    owner: str,
    run_id: str,
    answers: Sequence[decisions.Decision],
    request_id: str = "",
) -> Decided:
    """Apply Resume's decisions to a suspended run.

    1. A request_id seen before: the same decisions return the same offset,
       others are RequestIdReused.
    2. Decisions already stored: equal ones are a repeat (same offset), a
       different one is InterruptResolved.
    3. Otherwise the run must be SUSPENDED (RunNotSuspended) and every
       decision must answer one of its pending interrupts, with a fitting
       kind (InvalidArgument).
    4. Store the decisions with a compare-and-set on the run's epoch
       (ConcurrentModification if another request changed it first). When
       every interrupt is answered, the run is QUEUED again, owned by `owner`.
    The offset is the index of the first event after the suspension.
    """
    fingerprint = decisions.fingerprint(answers)
    record = await log.get_run(run_id)
    if request_id:
        seen = await log.resume_request(run_id, request_id)
        if seen is not None:
            earlier = json.loads(seen)
            if earlier["fingerprint"] != fingerprint:
                raise RequestIdReused(request_id, run_id)
            return Decided(int(earlier["offset"]))
    stored = decisions.load(record)
    repeat = decisions.repeat_offset(run_id, stored, answers)
    if repeat is not None:
        return Decided(repeat)
    if record.state is not RunState.SUSPENDED:
        raise RunNotSuspended(run_id, record.state.value)
    checkpoint = Checkpoint.decode(record.checkpoint)
    decisions.check_answers(checkpoint, answers)
    offset = checkpoint.next_index
    stored.update({d.tool_call_id: decisions.Stored(d, offset) for d in answers})
    complete = all(i["tool_call_id"] in stored for i in checkpoint.interrupts)
    try:
        resumed = await log.decide(
            run_id,
            expected_epoch=record.epoch,
            decisions=decisions.dump(stored),
            owner=owner,
            resume=complete,
            request_id=request_id,
            request_record=json.dumps({"fingerprint": fingerprint, "offset": offset}).encode(),
        )
    except ConcurrentModification:
        # The same decisions, sent twice at once, are still a repeat.
        now = decisions.load(await log.get_run(run_id))
        again = decisions.repeat_offset(run_id, now, answers)
        if again is None:
            raise
        return Decided(again)
    return Decided(offset, resumed if complete else None)
