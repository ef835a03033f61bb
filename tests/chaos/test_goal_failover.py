"""A run with a goal across a SIGKILL of its owner between two attempts: the judgment
already made is neither lost nor made again, and the run goes on with the next attempt."""

from __future__ import annotations

import json

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.agents.checkpoint import Checkpoint
from server.events.log import EventLog
from tests.chaos.conftest import Cluster, effective_events, kinds, observe_all, wait_for


async def test_a_goal_survives_sigkill_of_its_owner_between_attempts(
    cluster: Cluster, store: EventLog
) -> None:
    first = await cluster.start(KEEL_INSTANCE_ID="first")
    second = await cluster.start(KEEL_INSTANCE_ID="second")
    processes = {"first": first, "second": second}
    # Each attempt streams 20 deltas 100 ms apart: two seconds to kill the owner in.
    script = json.dumps({"steps": [{"text": 20, "delay_ms": 100}], "satisfy_on": 3})
    goal = pb.Goal(objective="end with DONE", judge_agent_id="scripted-judge", max_attempts=5)
    async with grpc.aio.insecure_channel(first.target) as channel:
        started = await pb_grpc.AgentServiceStub(channel).StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script, goal=goal)
        )
    run_id = started.run.run_id

    async def judged_once_and_attempt_two_began() -> bool:
        record = await store.get_run(run_id)
        if not record.checkpoint:
            return False
        checkpoint = Checkpoint.decode(record.checkpoint)
        # Past the first verdict's checkpoint, attempt 2 has written events: a kill now
        # cuts it short (a kill right at the checkpoint would leave nothing to supersede).
        return checkpoint.judged == 1 and record.next_index > checkpoint.next_index

    await wait_for(judged_once_and_attempt_two_began, what="the judge's first verdict")
    owner = (await store.get_run(run_id)).owner
    doomed = processes[owner]
    survivor = second if doomed is first else first
    doomed.kill()
    await doomed.wait()

    events = await observe_all(survivor.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert {e.run_id for e in events} == {run_id}
    assert kinds(events)[-1] == "finish"
    judged = [e.goal_evaluated for e in events if e.WhichOneof("payload") == "goal_evaluated"]
    assert [(j.attempt, j.satisfied) for j in judged] == [(1, False), (2, False), (3, True)]
    assert "step_superseded" in kinds(events)  # attempt 2 was cut short, and run again
    effective = effective_events(events)
    deltas = [e.text_delta.delta for e in effective if e.WhichOneof("payload") == "text_delta"]
    numbered = [d for d in deltas if d.startswith("t")]
    assert numbered == [f"t{i} " for i in range(60)]  # three attempts, each delta once
    assert events[-1].finish.goal_met
    record = await store.get_run(run_id)
    assert record.owner != owner and record.epoch >= 2
    assert record.goal_progress == "3:1"
